//! This host's name, for the default ids a replica and an agent instance
//! give themselves (a pod's name under Kubernetes).

/// The host name, if it can go into an id as it is: 1 to 64 visible ASCII
/// characters without a comma (agents list replica ids comma-separated in
/// a header). Read with gethostname(2), not from
/// `/proc/sys/kernel/hostname`, which systemd's `ProcSubset=pid` hides.
pub fn name() -> Option<String> {
    let name = hostname::get().ok()?.into_string().ok()?;
    let name = name.trim();
    let usable =
        (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_graphic() && b != b',');
    usable.then(|| name.to_owned())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_name_is_the_one_the_kernel_holds_when_it_fits_an_id() {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let kernel = kernel.trim();
        match super::name() {
            Some(n) => assert_eq!(n, kernel),
            None => assert!(
                kernel.is_empty() || kernel.len() > 64 || kernel.contains([',', ' ']),
                "{kernel:?} fits an id but was not taken"
            ),
        }
    }
}
