//! A fake Kubernetes API server for the Services of one namespace: it
//! answers the list (`GET /api/v1/namespaces/NS/services`) and streams watch
//! events (`?watch=true`) as the test changes its Services, and can expire a
//! watch (an ERROR event with 410 Gone, as the real one does when the
//! resourceVersion is too old) or drop it. Plain HTTP on loopback, no auth;
//! a kubeconfig for it is written next to it.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// What a live watch is told.
enum Push {
    Line(String),
    Gone,
    Drop,
}

#[derive(Default)]
struct State {
    services: BTreeMap<String, Value>,
    resource_version: u64,
    /// Every event with its resourceVersion: a watch from version X gets
    /// the ones after X first, as from the real API server.
    events: Vec<(u64, String)>,
    watches: Vec<mpsc::UnboundedSender<Push>>,
    /// Watch requests so far.
    watches_started: usize,
    /// Every request's path and query, in order.
    requests: Vec<String>,
}

impl State {
    /// Records an event and sends it to every live watch.
    fn publish(&mut self, line: String) {
        let rv = self.resource_version;
        self.events.push((rv, line.clone()));
        self.watches
            .retain(|w| w.send(Push::Line(line.clone())).is_ok());
    }
}

/// The fake API server (runs until the test's runtime ends).
#[derive(Clone)]
pub(crate) struct FakeKube {
    state: Arc<Mutex<State>>,
    pub addr: SocketAddr,
    pub namespace: String,
}

/// A Service object with `ports` (name, port, protocol) and annotations.
pub(crate) fn service(
    ns: &str,
    name: &str,
    annotations: &[(&str, &str)],
    ports: &[(&str, u16, &str)],
) -> Value {
    let ann: serde_json::Map<String, Value> = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "annotations": ann, "uid": format!("uid-{ns}-{name}")},
        "spec": {
            "type": "ClusterIP",
            "ports": ports.iter().map(|(n, p, proto)| {
                let mut port = json!({"port": p, "protocol": proto});
                if !n.is_empty() { port["name"] = json!(n); }
                port
            }).collect::<Vec<_>>()
        }
    })
}

impl FakeKube {
    /// Starts it for namespace `ns`.
    pub(crate) async fn start(ns: &str) -> FakeKube {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let k = FakeKube {
            state: Arc::default(),
            addr,
            namespace: ns.to_owned(),
        };
        let server = k.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let k = server.clone();
                tokio::spawn(async move { k.serve(s).await });
            }
        });
        k
    }

    /// A kubeconfig file for it, in `dir`.
    pub(crate) fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig.yaml");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
                 users:\n- name: nobody\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: nobody\n    namespace: {}\n\
                 current-context: fake\n",
                self.addr, self.namespace
            ),
        )
        .unwrap();
        path
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds or changes a Service; watches see ADDED or MODIFIED (unless
    /// `quietly`: then only a later list sees it, like an event lost while
    /// no watch was open).
    pub(crate) fn apply(&self, mut svc: Value, quietly: bool) {
        let mut st = self.lock();
        st.resource_version += 1;
        svc["metadata"]["resourceVersion"] = json!(st.resource_version.to_string());
        let name = svc["metadata"]["name"].as_str().unwrap().to_owned();
        let kind = if st.services.contains_key(&name) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.services.insert(name, svc.clone());
        if !quietly {
            let line = json!({"type": kind, "object": svc}).to_string();
            st.watches
                .retain(|w| w.send(Push::Line(line.clone())).is_ok());
        }
    }

    /// Deletes a Service; watches see DELETED.
    pub(crate) fn delete(&self, name: &str) {
        let mut st = self.lock();
        st.resource_version += 1;
        let Some(mut svc) = st.services.remove(name) else {
            return;
        };
        svc["metadata"]["resourceVersion"] = json!(st.resource_version.to_string());
        let line = json!({"type": "DELETED", "object": svc}).to_string();
        st.watches
            .retain(|w| w.send(Push::Line(line.clone())).is_ok());
    }

    /// Every open watch ends with an ERROR event, 410 Gone, and the event
    /// history is forgotten (a watch from an older version gets 410 too).
    pub(crate) fn expire_watches(&self) {
        let mut st = self.lock();
        st.events.clear();
        st.watches.retain(|w| w.send(Push::Gone).is_ok());
    }

    /// Every open watch's connection is cut.
    pub(crate) fn drop_watches(&self) {
        self.lock().watches.retain(|w| w.send(Push::Drop).is_ok());
    }

    /// How many list (not watch) requests came so far.
    pub(crate) fn lists(&self) -> usize {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.contains("/services") && !r.contains("watch=true"))
            .count()
    }

    /// How many requests for `path` (list or watch) came so far.
    pub(crate) fn requests_for(&self, path: &str) -> usize {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.split('?').next() == Some(path))
            .count()
    }

    /// How many watch requests came so far.
    pub(crate) fn watches_started(&self) -> usize {
        self.lock().watches_started
    }

    async fn serve(&self, s: tokio::net::TcpStream) {
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let target = line.split_whitespace().nth(1).unwrap_or("").to_owned();
            // Skip the headers (GET requests have no body).
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).await.unwrap_or(0) == 0 {
                    return;
                }
                if h == "\r\n" {
                    break;
                }
            }
            self.lock().requests.push(target.clone());
            let want = format!("/api/v1/namespaces/{}/services", self.namespace);
            let path = target.split('?').next().unwrap_or("");
            let other_namespace = path
                .strip_prefix("/api/v1/namespaces/")
                .and_then(|p| p.strip_suffix("/services"))
                .filter(|ns| !ns.contains('/'));
            if let (true, Some(ns)) = (path != want, other_namespace) {
                // As the real one answers a service account without a Role
                // there.
                let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403, "reason": "Forbidden", "message": format!("services is forbidden: cannot list resource \"services\" in API group \"\" in the namespace \"{ns}\"")}).to_string();
                let _ = w.write_all(format!("HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes()).await;
                continue;
            }
            if path != want {
                let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound", "message": format!("{path} not found")}).to_string();
                let _ = w.write_all(format!("HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes()).await;
                continue;
            }
            if !target.contains("watch=true") {
                let body = {
                    let st = self.lock();
                    json!({
                        "kind": "ServiceList",
                        "apiVersion": "v1",
                        "metadata": {"resourceVersion": st.resource_version.to_string()},
                        "items": st.services.values().cloned().collect::<Vec<_>>()
                    })
                    .to_string()
                };
                let _ = w
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
                continue;
            }
            // A watch: the events after the version asked for, then events
            // as they come, until told to end; the body ends when the
            // connection closes.
            let from: u64 = target
                .split(['?', '&'])
                .find_map(|kv| kv.strip_prefix("resourceVersion="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let (tx, mut rx) = mpsc::unbounded_channel();
            {
                let mut st = self.lock();
                st.watches_started += 1;
                let oldest = st
                    .events
                    .first()
                    .map_or(st.resource_version, |(rv, _)| rv - 1);
                if from < oldest {
                    let _ = tx.send(Push::Gone);
                } else {
                    for (rv, line) in &st.events {
                        if *rv > from {
                            let _ = tx.send(Push::Line(line.clone()));
                        }
                    }
                }
                st.watches.push(tx);
            }
            if w.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n",
            )
            .await
            .is_err()
            {
                return;
            }
            while let Some(push) = rx.recv().await {
                let line = match push {
                    Push::Line(l) => l,
                    Push::Gone => json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410, "reason": "Expired", "message": "too old resource version"}}).to_string(),
                    Push::Drop => return,
                };
                if w.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                    return;
                }
                if line.contains("\"code\":410") {
                    let _ = w.shutdown().await;
                    return;
                }
            }
            return;
        }
    }
}
