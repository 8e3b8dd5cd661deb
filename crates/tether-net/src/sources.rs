//! Counting connections per source address, so that one host cannot take
//! every slot of a port: IPv4 addresses as they are, IPv6 by their /64.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Open connections per source address (IPv6 counted per /64): the
/// server's public port and its `[[listener]]` ports, and the metrics
/// endpoint of every process, each with its own table.
#[derive(Default)]
pub struct SourceCounts(Mutex<HashMap<IpAddr, usize>>);

/// One source's connection slot, given back on drop.
pub struct SourceSlot(Arc<SourceCounts>, IpAddr);

impl SourceCounts {
    /// Takes a slot for `ip` if it holds fewer than `max`.
    pub fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<SourceSlot> {
        let key = source_key(ip);
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = g.entry(key).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(SourceSlot(self.clone(), key))
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut g = (self.0).0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = g.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                g.remove(&self.1);
            }
        }
    }
}

/// The address a source is counted under: IPv4 as is, IPv6 by its /64
/// (one host usually holds a whole /64).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}
