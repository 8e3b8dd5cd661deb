//! Services discovered from the Kubernetes API (`[kubernetes]` in the
//! agent config).
//!
//! The agent watches Services in the configured namespaces (kube-runtime's
//! watcher: list, then watch from the list's resourceVersion; a watch that
//! expires with 410 Gone or a dropped connection is listed again, with
//! backoff). A Service is published when it carries the annotation
//! `tether.dev/expose: "true"` (or when `require_annotation = false`, every
//! Service the label selector matches), one entry per port:
//!
//! * name: `tether.dev/name`, else the Service's name, with `-NAMESPACE`
//!   when more than one namespace is watched, and `-PORTNAME` (or
//!   `-PORT`) when it has several ports;
//! * kind: `http` for a port named `http`/`http-*`/`web` or with
//!   `appProtocol: http` (also gRPC-Web's `grpc-web`/`grpc-web-*`), `http2`
//!   (cleartext HTTP/2: gRPC) for any other port named `grpc`/`grpc-*` or
//!   `http2`/`http2-*` (Istio's names) or with `appProtocol:
//!   kubernetes.io/h2c` or `grpc`, `udp` for UDP ports, `tcp` otherwise
//!   (SCTP ports are not published); the annotation `tether.dev/kind`
//!   (`tcp`, `udp`, `http`, `http2`) overrides it for every port, and an
//!   unknown value is warned about and ignored;
//! * address: `NAME.NAMESPACE.svc.CLUSTER_DOMAIN:PORT`, dialed like a raw
//!   target: the agent's `allow` list still decides (so an operator's
//!   allow-list bounds what discovery can publish), the name resolves with
//!   the agent's resolver and every address is checked.
//!
//! What is found is kept in [`Discovered`]; each change is announced to the
//! server again (CATALOG replaces the previous list), so the console and the
//! SOCKS proxy see it without a restart.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Service as K8sService;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::runtime::utils::{Backoff, StreamBackoff};
use kube::runtime::watcher;
use kube::{Api, Client};
use serde::Deserialize;
use tether_proto::frame::{CatalogEntry, ServiceKind, MAX_CATALOG_PAYLOAD};

use crate::policy::TargetPolicy;
use crate::stats::AgentStats;
use tokio::sync::watch;

/// The annotation that publishes a Service.
pub const EXPOSE_ANNOTATION: &str = "tether.dev/expose";
/// The annotation that names it (instead of the Service's name).
pub const NAME_ANNOTATION: &str = "tether.dev/name";
/// The annotation that sets its kind (`http`, `http2` (also `h2c`, `grpc`),
/// `tcp`, `udp`).
pub const KIND_ANNOTATION: &str = "tether.dev/kind";

/// `[kubernetes]`: which Services to publish.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesDiscovery {
    /// Namespaces to watch; `["*"]` for all (needs a ClusterRole). Default:
    /// the agent's own namespace (its service account's, or
    /// `POD_NAMESPACE`).
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Only Services with these labels (a Kubernetes label selector, e.g.
    /// `team=shop,tier!=internal`), filtered by the API server.
    #[serde(default)]
    pub label_selector: Option<String>,
    /// Publish only Services annotated `tether.dev/expose: "true"`
    /// (default); with `false`, every Service the selector matches.
    #[serde(default = "yes")]
    pub require_annotation: bool,
    /// The cluster's DNS domain, for the addresses dialed.
    #[serde(default = "default_cluster_domain")]
    pub cluster_domain: String,
    /// A kubeconfig file to use instead of the in-cluster service account
    /// (or `KUBECONFIG`).
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
}

fn yes() -> bool {
    true
}

impl KubernetesDiscovery {
    /// Checks what the API server would refuse at every list, or what would
    /// make every discovered address unusable, before the agent starts
    /// (`tether agent --check-config` too): namespaces are `*` or
    /// Kubernetes names (DNS labels), the cluster domain is a DNS name, a
    /// label selector is not empty.
    pub fn check(&self) -> anyhow::Result<()> {
        for ns in &self.namespaces {
            if ns != "*" && !is_dns_label(ns) {
                anyhow::bail!("[kubernetes] namespaces: {ns:?} is not a namespace name (1-63 lower-case letters, digits and '-', starting and ending with a letter or digit) nor \"*\"");
            }
        }
        let domain = &self.cluster_domain;
        if domain.len() > 253 || !domain.split('.').all(is_dns_label) {
            anyhow::bail!("[kubernetes] cluster_domain: {domain:?} is not a DNS name such as \"cluster.local\"");
        }
        if let Some(sel) = &self.label_selector {
            if sel.trim().is_empty() || sel.chars().any(char::is_control) {
                anyhow::bail!("[kubernetes] label_selector: {sel:?} is empty or holds a control character (leave it out to match every Service)");
            }
        }
        Ok(())
    }
}

/// A DNS label as Kubernetes names namespaces (RFC 1123): 1 to 63 lower-case
/// letters, digits and `-`, starting and ending with a letter or digit.
fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=63).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

fn default_cluster_domain() -> String {
    "cluster.local".to_owned()
}

impl Default for KubernetesDiscovery {
    fn default() -> Self {
        KubernetesDiscovery {
            namespaces: vec![],
            label_selector: None,
            require_annotation: true,
            cluster_domain: default_cluster_domain(),
            kubeconfig: None,
        }
    }
}

/// One published service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// `HOST:PORT` to dial (a raw target: the allow list decides).
    pub address: String,
    /// What it speaks.
    pub kind: ServiceKind,
    /// Where it came from: `NAMESPACE/SERVICE:PORT`.
    pub source: String,
}

/// The services discovery found, by name; [`Discovered::changes`] ticks on
/// every change.
#[derive(Debug)]
pub struct Discovered {
    map: RwLock<BTreeMap<String, Found>>,
    version: watch::Sender<u64>,
}

impl Default for Discovered {
    fn default() -> Self {
        Discovered {
            map: RwLock::default(),
            version: watch::channel(0).0,
        }
    }
}

impl Discovered {
    /// The service published as `name`.
    pub fn get(&self, name: &str) -> Option<Found> {
        self.read().get(name).cloned()
    }

    /// Names and kinds for the CATALOG, skipping names in `taken` (the
    /// configured services win).
    pub fn catalog(&self, taken: &dyn Fn(&str) -> bool) -> Vec<CatalogEntry> {
        self.read()
            .iter()
            .filter(|(name, _)| !taken(name))
            .map(|(name, f)| CatalogEntry {
                name: name.clone(),
                kind: f.kind,
                host: String::new(),
            })
            .collect()
    }

    /// Ticks whenever the published set changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Replaces the published set; logs and announces what changed.
    pub(crate) fn replace(&self, next: BTreeMap<String, Found>) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if *map == next {
            return;
        }
        let added: Vec<&String> = next
            .iter()
            .filter(|(k, v)| map.get(*k) != Some(v))
            .map(|(k, _)| k)
            .collect();
        let removed: Vec<&String> = map.keys().filter(|k| !next.contains_key(*k)).collect();
        tracing::info!(added = ?added, removed = ?removed, services = next.len(), "discovered services changed");
        *map = next;
        drop(map);
        self.version.send_modify(|v| *v += 1);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Found>> {
        self.map.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// The agent's own namespace, when it runs in a pod.
fn own_namespace() -> Option<String> {
    std::env::var("POD_NAMESPACE")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace").ok()
        })
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Whether a port is gRPC-Web by the meshes' naming (`grpc-web`,
/// `grpc-web-*`) or its `appProtocol`: HTTP that browsers send, not
/// HTTP/2 only.
fn is_grpc_web(port_name: &str, app_protocol: &str) -> bool {
    port_name == "grpc-web"
        || port_name.starts_with("grpc-web-")
        || app_protocol.eq_ignore_ascii_case("grpc-web")
}

/// A plain service name: what the server accepts in links and host names.
fn plain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// What one Service publishes (empty when it is not to be published).
pub fn entries_of(
    svc: &K8sService,
    cfg: &KubernetesDiscovery,
    several_namespaces: bool,
) -> Vec<(String, Found)> {
    let meta = &svc.metadata;
    let (Some(name), Some(ns)) = (meta.name.as_deref(), meta.namespace.as_deref()) else {
        return vec![];
    };
    let annotations = meta.annotations.clone().unwrap_or_default();
    let exposed = annotations
        .get(EXPOSE_ANNOTATION)
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    if cfg.require_annotation && !exposed {
        return vec![];
    }
    if annotations
        .get(EXPOSE_ANNOTATION)
        .is_some_and(|v| v.eq_ignore_ascii_case("false"))
    {
        return vec![];
    }
    let Some(spec) = &svc.spec else {
        return vec![];
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        // Its DNS name points outside the cluster: publish it by hand.
        return vec![];
    }
    // A headless Service's name resolves to its pods' own addresses, where
    // the target port listens and the Service's port means nothing.
    let headless = spec.cluster_ip.as_deref() == Some("None");
    let ports = spec.ports.clone().unwrap_or_default();
    let base = match annotations.get(NAME_ANNOTATION) {
        Some(n) => n.clone(),
        None if several_namespaces => format!("{name}-{ns}"),
        None => name.to_owned(),
    };
    let mut kind_override = annotations
        .get(KIND_ANNOTATION)
        .map(|k| k.to_ascii_lowercase());
    if let Some(k) = kind_override.as_deref() {
        if !matches!(k, "tcp" | "udp" | "http" | "http2" | "h2c" | "grpc") {
            if first_warning(format!("kind {ns}/{name} {k}")) {
                tracing::warn!(service = %format!("{ns}/{name}"), kind = %k, "{KIND_ANNOTATION} is not one of tcp, udp, http, http2 (h2c, grpc): ignored");
            }
            kind_override = None;
        }
    }
    let mut out = vec![];
    for p in &ports {
        let Ok(port) = u16::try_from(p.port) else {
            continue;
        };
        if p.protocol.as_deref() == Some("SCTP") {
            if first_warning(format!("sctp {ns}/{name}:{port}")) {
                tracing::warn!(service = %format!("{ns}/{name}"), port, "an SCTP port is not published (the agent dials TCP and UDP)");
            }
            continue;
        }
        let pname = p.name.clone().unwrap_or_default();
        let dial_port = if headless {
            match &p.target_port {
                Some(IntOrString::Int(n)) if *n != 0 => match u16::try_from(*n) {
                    Ok(n) => n,
                    Err(_) => continue,
                },
                // A named target port is looked up in each pod, which the
                // agent does not read: charts name the port the Service
                // number almost always, so that number is dialed.
                Some(IntOrString::String(named)) if !named.is_empty() => {
                    tracing::debug!(service = %format!("{ns}/{name}"), port, target_port = %named, "headless service with a named target port: dialing the service's port number");
                    port
                }
                // None, 0 or "": the target port is the port.
                _ => port,
            }
        } else {
            port
        };
        let published = if ports.len() == 1 {
            base.clone()
        } else if pname.is_empty() {
            format!("{base}-{port}")
        } else {
            format!("{base}-{pname}")
        };
        if !plain(&published) {
            if first_warning(format!("name {ns}/{name} {published}")) {
                tracing::warn!(service = %format!("{ns}/{name}"), name = %published, "discovered service not published: its name must be 1-63 letters, digits, '-', '_' or '.' (set {NAME_ANNOTATION})");
            }
            continue;
        }
        let udp = p.protocol.as_deref() == Some("UDP");
        let app_protocol = p.app_protocol.as_deref().unwrap_or("");
        let kind = match kind_override.as_deref() {
            Some("http") => ServiceKind::Http,
            Some("http2" | "h2c" | "grpc") => ServiceKind::Http2,
            Some("udp") => ServiceKind::Udp,
            Some(_) => ServiceKind::Tcp, // "tcp"; anything else was dropped above
            None if udp => ServiceKind::Udp,
            // Cleartext HTTP/2 by the Kubernetes convention
            // (`appProtocol: kubernetes.io/h2c`) or the service meshes'
            // (a port named `grpc` or `grpc-*`, but not `grpc-web`: gRPC-Web
            // is for browsers, over HTTP/1.1 as often as not).
            None if !is_grpc_web(&pname, app_protocol)
                && (app_protocol.eq_ignore_ascii_case("kubernetes.io/h2c")
                    || app_protocol.eq_ignore_ascii_case("grpc")
                    || pname == "grpc"
                    || pname.starts_with("grpc-")
                    || pname == "http2"
                    || pname.starts_with("http2-")) =>
            {
                ServiceKind::Http2
            }
            None if pname == "http"
                || pname.starts_with("http-")
                || pname == "web"
                || is_grpc_web(&pname, app_protocol)
                || app_protocol.eq_ignore_ascii_case("http") =>
            {
                ServiceKind::Http
            }
            None => ServiceKind::Tcp,
        };
        out.push((
            published,
            Found {
                address: format!("{name}.{ns}.svc.{}:{dial_port}", cfg.cluster_domain),
                kind,
                source: format!("{ns}/{name}:{port}"),
            },
        ));
    }
    out
}

/// What one Service publishes, worked out when it is listed or changes (so
/// its warnings come then, not at every other Service's change), kept
/// instead of the Service itself: for `"*"` a watcher sees every Service of
/// the cluster, each several KiB with its `managedFields`.
#[derive(Clone)]
struct Listed {
    /// When it was created: the oldest claim to a name wins.
    created: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    entries: Vec<(String, Found)>,
}

/// What one watcher's Services publish, by `namespace/name`; a Service that
/// publishes nothing is not kept.
type Seen = HashMap<String, Listed>;

/// A Service's key in [`Seen`]: `namespace/name`.
fn key_of(svc: &K8sService) -> String {
    format!(
        "{}/{}",
        svc.metadata.namespace.as_deref().unwrap_or(""),
        svc.metadata.name.as_deref().unwrap_or("")
    )
}

/// Adds (or, when it publishes nothing, removes) a Service's entries.
fn note(seen: &mut Seen, svc: &K8sService, cfg: &KubernetesDiscovery, several: bool) {
    let key = key_of(svc);
    let entries = entries_of(svc, cfg, several);
    if entries.is_empty() {
        seen.remove(&key);
    } else {
        let created = svc.metadata.creation_timestamp.clone();
        seen.insert(key, Listed { created, entries });
    }
}

/// What [`publish`] warned about last time, so that a standing problem is
/// told once, not at every change in the watched namespaces.
#[derive(Debug, Default)]
struct Warned {
    /// Names two Services claim: (name, the one not published).
    claims: BTreeSet<(String, String)>,
    /// Services (`NAMESPACE/SERVICE:PORT`) whose address the allow list
    /// refuses.
    refused: BTreeSet<String>,
    /// Whether the set did not fit one catalog.
    overflowed: bool,
}

/// Rebuilds the published set from what every watcher sees. A Service
/// whose address the agent's allow list refuses (`allowed` is false: its
/// name matches no rule) is not published: a client would see it and never
/// reach it. A name two Services claim goes to the one created first (then
/// the first by `namespace/name`), and a warning names both: a Service
/// created later, in any watched namespace, cannot take over a name users
/// already reach (and send their cookies to).
fn publish(
    discovered: &Discovered,
    seen: &[Seen],
    allowed: &dyn Fn(&str) -> bool,
    warned: &mut Warned,
) {
    let mut all: Vec<(&String, &Listed)> = seen.iter().flat_map(|s| s.iter()).collect();
    // Oldest first; a Service without a creation time (never from a real
    // API server) last.
    let created = |l: &Listed| (l.created.is_none(), l.created.clone());
    all.sort_by(|a, b| created(a.1).cmp(&created(b.1)).then_with(|| a.0.cmp(b.0)));
    let mut next = BTreeMap::new();
    let mut size = 0usize;
    let mut claims = BTreeSet::new();
    let mut refused = BTreeSet::new();
    let mut overflowed = false;
    'services: for (_, listed) in all {
        for (name, found) in &listed.entries {
            if !allowed(&found.address) {
                if !warned.refused.contains(&found.source) {
                    tracing::warn!(%name, address = %found.address, source = %found.source, "discovered service not published: its address is not in the agent's allow list");
                }
                refused.insert(found.source.clone());
                continue;
            }
            if let Some(first) = next.get(name) {
                let first: &Found = first;
                let claim = (name.clone(), found.source.clone());
                if !warned.claims.contains(&claim) {
                    tracing::warn!(%name, kept = %first.source, ignored = %found.source, "two discovered services claim one name (set {NAME_ANNOTATION} on one)");
                }
                claims.insert(claim);
                continue;
            }
            // Stay within one CATALOG frame (3 bytes + name per entry).
            size += 3 + name.len();
            if size > MAX_CATALOG_PAYLOAD - 4096 {
                if !warned.overflowed {
                    tracing::warn!(%name, "too many discovered services for one catalog: the rest are not published");
                }
                overflowed = true;
                break 'services;
            }
            next.insert(name.clone(), found.clone());
        }
    }
    *warned = Warned {
        claims,
        refused,
        overflowed,
    };
    discovered.replace(next);
}

/// Watches the configured namespaces and keeps `discovered` up to date,
/// forever (the watcher relists and retries on its own; a client that
/// cannot even be built is retried every 30 s).
pub async fn run(
    cfg: KubernetesDiscovery,
    discovered: Arc<Discovered>,
    policy: Arc<TargetPolicy>,
    stats: Arc<AgentStats>,
) {
    let client = loop {
        match client(&cfg).await {
            Ok(c) => break c,
            Err(e) => {
                // Counted as failing: nothing is discovered meanwhile.
                stats.discovery_errors.fetch_add(1, Ordering::Relaxed);
                stats
                    .discovery_failing
                    .store(cfg.namespaces.len().max(1) as i64, Ordering::Relaxed);
                tracing::warn!(
                    "kubernetes discovery: cannot build an API client: {e:#} (retrying in 30 s)"
                );
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        }
    };
    stats.discovery_failing.store(0, Ordering::Relaxed);
    let namespaces = if cfg.namespaces.is_empty() {
        // With a kubeconfig, its context's (which is "default" when it
        // names none; it may be another cluster's than the pod's); else
        // the pod's own.
        let own = cfg.kubeconfig.is_none().then(own_namespace).flatten();
        vec![own.unwrap_or_else(|| client.default_namespace().to_owned())]
    } else if cfg.namespaces.iter().any(|n| n == "*") {
        // All of them: another watcher beside would see its Services twice.
        vec!["*".to_owned()]
    } else {
        let mut listed = cfg.namespaces.clone();
        listed.sort();
        listed.dedup();
        listed
    };
    // As configured, before the duplicates went: a namespace listed twice
    // keeps the names it had (`-NAMESPACE`).
    let several = cfg.namespaces.len() > 1 || namespaces.iter().any(|n| n == "*");
    tracing::info!(namespaces = ?namespaces, label_selector = ?cfg.label_selector, require_annotation = cfg.require_annotation, "kubernetes discovery: watching Services");
    let mut wcfg = watcher::Config::default();
    if let Some(sel) = &cfg.label_selector {
        wcfg = wcfg.labels(sel);
    }
    // One watcher per namespace, merged; events carry which one.
    let answered: Vec<Arc<AtomicBool>> = namespaces.iter().map(|_| Arc::default()).collect();
    let streams = namespaces.iter().enumerate().map(|(i, ns)| {
        let api: Api<K8sService> = if ns == "*" {
            Api::all(client.clone())
        } else {
            Api::namespaced(client.clone(), ns)
        };
        let backoff = ListBackoff::new(answered[i].clone());
        StreamBackoff::new(watcher(api, wcfg.clone()), backoff)
            .map(move |e| (i, e))
            .boxed()
    });
    let mut events = futures_util::stream::select_all(streams);
    // The last error each watcher reported, and when: a repeat goes to the
    // debug log. It stands until the watcher shows it works (a list, or an
    // event from its watch) or reports nothing for RECOVERED_AFTER (a watch
    // that came back quietly: a failing one retries at least every 30 s).
    let mut failing: Vec<Option<(String, tokio::time::Instant)>> = vec![None; namespaces.len()];
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    let mut seen: Vec<Seen> = vec![Seen::new(); namespaces.len()];
    // A relist in progress, per watcher.
    let mut relist: Vec<Option<Seen>> = vec![None; namespaces.len()];
    let mut warned = Warned::default();
    let allowed = |address: &str| policy.resolve(address).is_ok();
    loop {
        let (i, event) = tokio::select! {
            next = events.next() => match next {
                Some(e) => e,
                None => return,
            },
            _ = tick.tick() => {
                for (i, f) in failing.iter_mut().enumerate() {
                    if f.as_ref().is_some_and(|(_, at)| at.elapsed() >= RECOVERED_AFTER) {
                        *f = None;
                        tracing::info!(namespace = %namespaces[i], "kubernetes discovery: no error for {RECOVERED_AFTER:?}: working again");
                    }
                }
                stats.discovery_failing.store(failing.iter().flatten().count() as i64, Ordering::Relaxed);
                continue;
            }
        };
        if matches!(
            event,
            Ok(watcher::Event::InitDone | watcher::Event::Apply(_) | watcher::Event::Delete(_))
        ) {
            // The API answered: the next error waits from the start, and
            // a standing one is over.
            answered[i].store(true, Ordering::Relaxed);
            if failing[i].take().is_some() {
                tracing::info!(namespace = %namespaces[i], "kubernetes discovery: working again");
            }
        }
        match event {
            Ok(watcher::Event::Init) => relist[i] = Some(Seen::new()),
            Ok(watcher::Event::InitApply(s)) => {
                if let Some(r) = relist[i].as_mut() {
                    note(r, &s, &cfg, several);
                }
            }
            Ok(watcher::Event::InitDone) => {
                if let Some(r) = relist[i].take() {
                    seen[i] = r;
                    publish(&discovered, &seen, &allowed, &mut warned);
                }
            }
            Ok(watcher::Event::Apply(s)) => {
                note(&mut seen[i], &s, &cfg, several);
                publish(&discovered, &seen, &allowed, &mut warned);
            }
            Ok(watcher::Event::Delete(s)) => {
                seen[i].remove(&key_of(&s));
                publish(&discovered, &seen, &allowed, &mut warned);
            }
            Err(e) => {
                // The watcher backs off and lists again by itself; what was
                // published stays until the next complete list says otherwise.
                stats.discovery_errors.fetch_add(1, Ordering::Relaxed);
                let why = e.to_string();
                let again = failing[i].as_ref().is_some_and(|(last, _)| *last == why);
                if again {
                    tracing::debug!(namespace = %namespaces[i], "kubernetes discovery: {why} (again; listing again after a backoff)");
                } else {
                    tracing::warn!(namespace = %namespaces[i], "kubernetes discovery: {why} (listing again after a backoff, up to 30 s apart; said again only if it changes)");
                }
                failing[i] = Some((why, tokio::time::Instant::now()));
            }
        }
        stats
            .discovery_failing
            .store(failing.iter().flatten().count() as i64, Ordering::Relaxed);
        stats
            .discovered_services
            .store(discovered.read().len() as i64, Ordering::Relaxed);
    }
}

/// Whether the warning `key` (a Service and what is wrong with it) is new:
/// a Service's entries are worked out again at every list (every few
/// minutes, and at each change), and a standing problem is said once.
/// Bounded: past 4 096 keys it starts over.
fn first_warning(key: String) -> bool {
    static TOLD: std::sync::Mutex<BTreeSet<String>> = std::sync::Mutex::new(BTreeSet::new());
    let mut told = TOLD.lock().unwrap_or_else(|p| p.into_inner());
    if told.len() >= 4096 {
        told.clear();
    }
    told.insert(key)
}

/// How long a watcher that reported an error must be quiet to count as
/// working again: a failing one tries again at least every 30 s.
const RECOVERED_AFTER: Duration = Duration::from_secs(90);

/// The wait between a watcher's attempts after an error: 0.8 s doubling to
/// 30 s (as client-go's reflector), with jitter, back to the start only
/// once the API answers again. kube-runtime's own backoff starts again at every
/// item the watcher yields, and after a failed list the next one is
/// `Event::Init`, made without a request: its delay never grew, and a
/// namespace the agent may not read (a missing Role) was listed every
/// 0.8 s for good.
struct ListBackoff {
    delay: tether_net::backoff::Backoff,
    /// Set by the event loop when the API answered (a complete list or a
    /// watch event).
    answered: Arc<AtomicBool>,
}

impl ListBackoff {
    fn new(answered: Arc<AtomicBool>) -> Self {
        ListBackoff {
            delay: tether_net::backoff::Backoff::starting_at(Duration::from_millis(800)),
            answered,
        }
    }
}

impl Iterator for ListBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        if self.answered.swap(false, Ordering::Relaxed) {
            self.delay.reset();
        }
        Some(self.delay.next_delay())
    }
}

impl Backoff for ListBackoff {
    /// Called for every item, `Event::Init` included: progress is judged
    /// by [`ListBackoff::answered`] instead.
    fn reset(&mut self) {}
}

async fn client(cfg: &KubernetesDiscovery) -> anyhow::Result<Client> {
    let config = match &cfg.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use kube::api::ObjectMeta;

    fn svc(
        name: &str,
        ns: &str,
        annotations: &[(&str, &str)],
        ports: &[(&str, i32, &str)],
    ) -> K8sService {
        K8sService {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                ports: Some(
                    ports
                        .iter()
                        .map(|(n, p, proto)| ServicePort {
                            name: (!n.is_empty()).then(|| n.to_string()),
                            port: *p,
                            protocol: Some(proto.to_string()),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_headless_service_is_dialed_on_its_target_port() {
        let cfg = KubernetesDiscovery::default();
        let expose = [(EXPOSE_ANNOTATION, "true")];
        let mut s = svc(
            "db",
            "shop",
            &expose,
            &[
                ("pg", 5432, "TCP"),
                ("web", 80, "TCP"),
                ("metrics", 9000, "TCP"),
            ],
        );
        let spec = s.spec.as_mut().unwrap();
        spec.cluster_ip = Some("None".into());
        let ports = spec.ports.as_mut().unwrap();
        ports[1].target_port = Some(IntOrString::Int(8080));
        ports[2].target_port = Some(IntOrString::String("metrics".into()));
        let mut zero = ports[0].clone();
        zero.name = Some("zero".into());
        zero.port = 7000;
        zero.target_port = Some(IntOrString::Int(0));
        ports.push(zero);
        let got: Vec<(String, String)> = entries_of(&s, &cfg, false)
            .into_iter()
            .map(|(n, f)| (n, f.address))
            .collect();
        assert_eq!(
            got,
            vec![
                // No targetPort: the port itself.
                ("db-pg".into(), "db.shop.svc.cluster.local:5432".into()),
                ("db-web".into(), "db.shop.svc.cluster.local:8080".into()),
                // A named target port is looked up in each pod: the
                // Service's number, which charts almost always give it.
                ("db-metrics".into(), "db.shop.svc.cluster.local:9000".into()),
                // 0 is no target port.
                ("db-zero".into(), "db.shop.svc.cluster.local:7000".into()),
            ]
        );
        // With a cluster IP, the Service's own port, whatever the target.
        s.spec.as_mut().unwrap().cluster_ip = Some("10.0.0.7".into());
        let addrs: Vec<String> = entries_of(&s, &cfg, false)
            .into_iter()
            .map(|(_, f)| f.address)
            .collect();
        assert_eq!(addrs[1], "db.shop.svc.cluster.local:80");
        assert_eq!(addrs.len(), 4);
    }

    #[test]
    fn settings_the_api_server_would_refuse_are_refused_at_start() {
        let ok = KubernetesDiscovery {
            namespaces: vec!["shop".into(), "*".into(), "team-2".into()],
            label_selector: Some("team=shop,tier!=internal".into()),
            ..KubernetesDiscovery::default()
        };
        assert!(ok.check().is_ok());
        for bad in [
            KubernetesDiscovery {
                namespaces: vec!["Shop".into()],
                ..KubernetesDiscovery::default()
            },
            KubernetesDiscovery {
                namespaces: vec!["-x".into()],
                ..KubernetesDiscovery::default()
            },
            KubernetesDiscovery {
                cluster_domain: "cluster..local".into(),
                ..KubernetesDiscovery::default()
            },
            KubernetesDiscovery {
                cluster_domain: "cluster.local:53".into(),
                ..KubernetesDiscovery::default()
            },
            KubernetesDiscovery {
                label_selector: Some(" ".into()),
                ..KubernetesDiscovery::default()
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names_kinds_and_addresses_follow_ports_and_annotations() {
        let cfg = KubernetesDiscovery::default();
        let expose = [(EXPOSE_ANNOTATION, "true")];
        assert!(entries_of(&svc("db", "shop", &[], &[("", 5432, "TCP")]), &cfg, false).is_empty());
        let e = entries_of(
            &svc("db", "shop", &expose, &[("", 5432, "TCP")]),
            &cfg,
            false,
        );
        assert_eq!(
            e,
            vec![(
                "db".to_owned(),
                Found {
                    address: "db.shop.svc.cluster.local:5432".into(),
                    kind: ServiceKind::Tcp,
                    source: "shop/db:5432".into()
                }
            )]
        );
        let e = entries_of(
            &svc(
                "grafana",
                "mon",
                &expose,
                &[
                    ("http", 3000, "TCP"),
                    ("dns", 53, "UDP"),
                    ("", 9000, "TCP"),
                    ("grpc-api", 9090, "TCP"),
                    ("grpc-web", 8080, "TCP"),
                    ("http2-api", 9091, "TCP"),
                    ("sig", 9092, "SCTP"),
                ],
            ),
            &cfg,
            true,
        );
        let names: Vec<(&str, ServiceKind)> = e.iter().map(|(n, f)| (n.as_str(), f.kind)).collect();
        assert_eq!(
            names,
            vec![
                ("grafana-mon-http", ServiceKind::Http),
                ("grafana-mon-dns", ServiceKind::Udp),
                ("grafana-mon-9000", ServiceKind::Tcp),
                ("grafana-mon-grpc-api", ServiceKind::Http2),
                ("grafana-mon-grpc-web", ServiceKind::Http),
                ("grafana-mon-http2-api", ServiceKind::Http2),
            ]
        );
        // The Kubernetes name for cleartext HTTP/2, and the kind annotation.
        let mut h2c = svc("api", "a", &expose, &[("", 8080, "TCP")]);
        if let Some(p) = h2c.spec.as_mut().and_then(|s| s.ports.as_mut()) {
            p[0].app_protocol = Some("kubernetes.io/h2c".into());
        }
        assert_eq!(entries_of(&h2c, &cfg, false)[0].1.kind, ServiceKind::Http2);
        let e = entries_of(
            &svc(
                "x",
                "a",
                &[(EXPOSE_ANNOTATION, "true"), (KIND_ANNOTATION, "grpc")],
                &[("", 80, "TCP")],
            ),
            &cfg,
            false,
        );
        assert_eq!(e[0].1.kind, ServiceKind::Http2);
        let e = entries_of(
            &svc(
                "x",
                "a",
                &[
                    (EXPOSE_ANNOTATION, "true"),
                    (NAME_ANNOTATION, "ui"),
                    (KIND_ANNOTATION, "http"),
                ],
                &[("", 80, "TCP")],
            ),
            &cfg,
            true,
        );
        assert_eq!(e[0].0, "ui");
        assert_eq!(e[0].1.kind, ServiceKind::Http);
        // An unknown kind is ignored: the port's own kind stands.
        let e = entries_of(
            &svc(
                "x",
                "a",
                &[(EXPOSE_ANNOTATION, "true"), (KIND_ANNOTATION, "https")],
                &[("http", 80, "TCP")],
            ),
            &cfg,
            false,
        );
        assert_eq!(e[0].1.kind, ServiceKind::Http);
        // A name the server would not accept is skipped.
        let e = entries_of(
            &svc(
                "x",
                "a",
                &[(EXPOSE_ANNOTATION, "true"), (NAME_ANNOTATION, "no/slash")],
                &[("", 80, "TCP")],
            ),
            &cfg,
            false,
        );
        assert!(e.is_empty());
        // Without the annotation requirement, every Service, but an explicit
        // "false" still hides one.
        let open = KubernetesDiscovery {
            require_annotation: false,
            ..Default::default()
        };
        assert_eq!(
            entries_of(&svc("db", "s", &[], &[("", 1, "TCP")]), &open, false).len(),
            1
        );
        assert!(entries_of(
            &svc(
                "db",
                "s",
                &[(EXPOSE_ANNOTATION, "false")],
                &[("", 1, "TCP")]
            ),
            &open,
            false
        )
        .is_empty());
    }

    #[test]
    fn one_name_claimed_twice_is_published_once() {
        let cfg = KubernetesDiscovery::default();
        let d = Discovered::default();
        // Services `web` in namespaces a and b both ask for the name `web`,
        // created at these times (none: never from a real API server).
        let both_claim_web = |created: [Option<i64>; 2]| {
            let mut seen = Seen::new();
            for (ns, at) in ["a", "b"].into_iter().zip(created) {
                let mut s = svc(
                    "web",
                    ns,
                    &[(EXPOSE_ANNOTATION, "true"), (NAME_ANNOTATION, "web")],
                    &[("", 80, "TCP")],
                );
                s.metadata.creation_timestamp = at.map(|secs| {
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                        k8s_openapi::chrono::DateTime::from_timestamp(secs, 0).unwrap(),
                    )
                });
                note(&mut seen, &s, &cfg, true);
            }
            seen
        };
        let mut warned = Warned::default();
        let all = |_: &str| true;
        let mut changes = d.changes();
        publish(&d, &[both_claim_web([None, None])], &all, &mut warned);
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        assert_eq!(d.get("web").unwrap().source, "a/web:80");
        assert_eq!(
            warned.claims,
            BTreeSet::from([("web".to_owned(), "b/web:80".to_owned())]),
            "the claim warned about, not again at the next change"
        );
        // The same set again is no change.
        publish(&d, &[both_claim_web([None, None])], &all, &mut warned);
        assert!(!changes.has_changed().unwrap());
        publish(&d, &[Seen::new()], &all, &mut warned);
        assert!(d.get("web").is_none());
        assert!(warned.claims.is_empty());

        // The one created first keeps the name, whatever its namespace is
        // called: `a/web`, created after `b/web`, does not take it over.
        let seen = both_claim_web([Some(2_000_000_000), Some(1_000_000_000)]);
        publish(&d, &[seen], &all, &mut warned);
        assert_eq!(d.get("web").unwrap().source, "b/web:80");
        // The allow list refuses b's address: a's takes the name, and b is
        // remembered as refused (warned once).
        let seen = both_claim_web([Some(2_000_000_000), Some(1_000_000_000)]);
        let not_b = |address: &str| !address.contains(".b.svc.");
        publish(&d, &[seen], &not_b, &mut warned);
        assert_eq!(d.get("web").unwrap().source, "a/web:80");
        assert_eq!(warned.refused, BTreeSet::from(["b/web:80".to_owned()]));
        assert!(warned.claims.is_empty());
        // A Service that publishes nothing is not kept.
        let mut seen = Seen::new();
        note(
            &mut seen,
            &svc("db", "a", &[], &[("", 5432, "TCP")]),
            &cfg,
            true,
        );
        assert!(seen.is_empty());
    }
}
