//! sd_notify against a real datagram socket: READY=1 once the endpoints serve,
//! STATUS= on each state change in order, WATCHDOG=1 when asked for, STOPPING=1 on drain.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

mod support;

use std::os::unix::net::UnixDatagram;
use std::time::Duration;
use support::{agent, base_config, trace_init, write_task_file};

#[tokio::test]
async fn notifies_ready_status_watchdog_and_stopping_in_order() {
    trace_init();
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, base_config(dir.path())).unwrap();
    let task = write_task_file(dir.path(), &dir.path().join("mnt"));

    let mut agent = agent(&config)
        .standalone(&task)
        .env("NOTIFY_SOCKET", socket_path.to_str().unwrap())
        // 2 s: the agent pings every second at most, so several pings arrive quickly.
        .env("WATCHDOG_USEC", "2000000")
        .start();

    let mut messages = vec![];
    let mut buf = [0u8; 4096];
    // Read until the agent is Ready and has pinged the watchdog twice.
    while messages.iter().filter(|m: &&String| *m == "WATCHDOG=1").count() < 2 {
        let n = socket.recv(&mut buf).unwrap_or_else(|e| panic!("no sd_notify datagram within 20 s ({e}); got {messages:?}"));
        messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    loop {
        let n = socket.recv(&mut buf).unwrap_or_else(|e| panic!("no STOPPING=1 within 20 s ({e}); got {messages:?}"));
        let m = String::from_utf8_lossy(&buf[..n]).into_owned();
        let done = m.starts_with("STATUS=stopped");
        messages.push(m);
        if done {
            break;
        }
    }
    assert_eq!(agent.wait_exit(Duration::from_secs(20)).await.code(), Some(0));

    let non_watchdog: Vec<&str> = messages.iter().map(String::as_str).filter(|m| *m != "WATCHDOG=1").collect();
    assert_eq!(
        non_watchdog,
        vec![
            "READY=1",
            "STATUS=starting",
            "STATUS=preparing: preparing volumes for task standalone-1",
            "STATUS=starting_engine: starting the engine",
            "STATUS=ready",
            "STATUS=draining: sigterm",
            "STOPPING=1",
            "STATUS=stopped: sigterm",
        ],
        "all messages: {messages:?}"
    );
    let first_ping = messages.iter().position(|m| m == "WATCHDOG=1").unwrap();
    assert!(first_ping > 0, "READY=1 comes before the first watchdog ping");
}
