//! An accept loop out of file descriptors waits instead of spinning, and
//! takes the waiting connection once a descriptor is free again.
//!
//! Its own test binary: it lowers the whole process's descriptor limit.
#![cfg(target_os = "linux")]

use std::time::Duration;

/// CPU time this process has used (user + system), from `/proc/self/stat`.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which may hold spaces) start with the state.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // Linux reports these in USER_HZ, 100 per second.
    Duration::from_millis(ticks * 10)
}

/// The highest descriptor number open (besides the one listing them).
fn highest_fd() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .unwrap()
}

#[tokio::test]
async fn an_accept_loop_out_of_descriptors_backs_off_then_serves() {
    let listener = tether_net::listen::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    // No descriptor free: the limit just above the highest one in use, and
    // every free number below it taken by /dev/null. The accept then fails
    // with EMFILE, at once, until the limit goes up. Nothing here may open
    // a file meanwhile.
    let before = cpu_time();
    rlimit::setrlimit(rlimit::Resource::NOFILE, highest_fd() + 1, hard).unwrap();
    let mut fillers = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        fillers.push(f);
        assert!(fillers.len() < 10_000, "the descriptor limit does not hold");
    }
    let accepting = tokio::spawn(async move { tether_net::listen::accept(&listener).await });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let finished_early = accepting.is_finished();
    rlimit::setrlimit(rlimit::Resource::NOFILE, soft, hard).unwrap();
    drop(fillers);
    let spent = cpu_time() - before;
    assert!(!finished_early, "accepted with no descriptor free");
    // A loop that retries at once would have taken the whole second.
    assert!(
        spent < Duration::from_millis(300),
        "the accept loop took {spent:?} of CPU in 1 s while out of descriptors"
    );
    let (_tcp, peer) = tokio::time::timeout(Duration::from_secs(2), accepting)
        .await
        .expect("accepts once a descriptor is free")
        .unwrap();
    assert_eq!(peer, client.local_addr().unwrap());
}
