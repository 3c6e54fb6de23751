//! The runner's loopback relay: in a sandbox whose only network is loopback (the
//! allow-list mode), the runner listens on `127.0.0.1:<port>` and relays each connection
//! to the worker's proxy socket bind-mounted into the sandbox. The agent and its tools
//! use it as their HTTP(S) proxy and Claude Code as its model endpoint; the policy is the
//! worker's (see `crate::proxy`), this only carries bytes.

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

/// The proxy socket inside the sandbox.
pub const SOCKET_ENV: &str = "AO_PROXY_SOCKET";
/// The loopback address to listen on (`127.0.0.1:port`).
pub const LISTEN_ENV: &str = "AO_PROXY_LISTEN";

/// Starts the relay when the sandbox asks for one. A relay that cannot start is reported
/// on standard error; the run goes on (its network calls will fail and say so).
pub fn start_from_env() {
    let (Some(socket), Some(listen)) =
        (std::env::var_os(SOCKET_ENV), std::env::var(LISTEN_ENV).ok())
    else {
        return;
    };
    let socket = PathBuf::from(socket);
    let listener = match TcpListener::bind(&listen) {
        Ok(l) => l,
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "runner: cannot listen on {listen} for the network relay: {e}"
            );
            return;
        }
    };
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let socket = socket.clone();
            std::thread::spawn(move || relay(client, &socket));
        }
    });
}

fn relay(client: TcpStream, socket: &std::path::Path) {
    let Ok(proxy) = UnixStream::connect(socket) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let (Ok(mut client_read), Ok(mut proxy_write)) = (client.try_clone(), proxy.try_clone()) else {
        return;
    };
    let upstream = std::thread::spawn(move || {
        let _ = std::io::copy(&mut client_read, &mut proxy_write);
        let _ = proxy_write.shutdown(Shutdown::Write);
    });
    let mut proxy_read = proxy;
    let mut client_write = client;
    let _ = std::io::copy(&mut proxy_read, &mut client_write);
    let _ = client_write.shutdown(Shutdown::Write);
    let _ = upstream.join();
}
