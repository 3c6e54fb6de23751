//! A TCP relay on loopback in front of a service (moto_server): stopping it closes the
//! listener and resets every relayed connection, starting it again on the same port
//! brings the service back. To the daemons that is the endpoint going away and
//! returning, without the service losing its state (moto_server keeps it in memory).

use std::net::SocketAddr;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

/// A TCP relay to a target address; dropping it leaves its task running, [`Relay::stop`]
/// ends it and every connection.
pub struct Relay {
    accept: JoinHandle<()>,
}

impl Relay {
    /// Listens on `addr` (reused at once after a stop) and relays every connection to
    /// `target`. Panics when `addr` cannot be bound.
    pub async fn start(addr: SocketAddr, target: SocketAddr) -> Relay {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("reuseaddr");
        socket.bind(addr).expect("bind the relay port");
        let listener: TcpListener = socket.listen(256).expect("listen");
        let accept = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                conns.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Relay { accept }
    }

    /// Stops accepting and resets every relayed connection (the JoinSet is dropped).
    pub async fn stop(self) {
        self.accept.abort();
        let _ = self.accept.await;
    }
}
