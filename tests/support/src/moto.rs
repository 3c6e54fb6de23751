//! A `moto_server` for tests: the real SQS, DynamoDB and Secrets Manager wire protocols on
//! a free loopback port, started on demand and stopped by a small watchdog shell once the
//! test process ends (a static is never dropped).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The region every test uses.
pub const REGION: &str = "us-east-1";

/// A running moto_server.
pub struct Moto {
    child: Child,
    pub endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: the watchdog shell's trap then stops moto_server too.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

impl Moto {
    /// Starts a moto_server on a free loopback port and waits until it accepts connections.
    pub fn start() -> Moto {
        assert!(
            on_path("moto_server"),
            "moto_server is not on PATH: the AWS tests need it \
             (install with: python3 -m pip install 'moto[server]==5.2.1'; make test does)"
        );
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("pick a free port")
            .port();
        // The watchdog ends moto_server when this test process is gone.
        let script = format!(
            "moto_server -H 127.0.0.1 -p {port} >/dev/null 2>&1 & m=$!; \
             trap 'kill $m 2>/dev/null' EXIT INT TERM; \
             while kill -0 {parent} 2>/dev/null && kill -0 $m 2>/dev/null; do sleep 0.5; done",
            parent = std::process::id()
        );
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("moto_server exited before it answered ({status})");
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not answer on {addr} within 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Moto {
            child,
            endpoint: format!("http://{addr}"),
        }
    }

    /// The server shared by this test binary.
    pub fn shared() -> &'static Moto {
        static MOTO: OnceLock<Moto> = OnceLock::new();
        MOTO.get_or_init(Moto::start)
    }

    /// The settings and credentials that point the daemons at this server.
    pub fn env(&self, prefix: &str) -> Vec<(String, String)> {
        [
            ("AO__BACKEND__KIND", "aws"),
            ("AO__AWS__ENDPOINT_URL", self.endpoint.as_str()),
            ("AO__AWS__REGION", REGION),
            ("AO__AWS__QUEUE_PREFIX", prefix),
            ("AO__AWS__TABLE", prefix),
            ("AO__AWS__CREATE_RESOURCES", "true"),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", REGION),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }
}

/// A name no other test uses, for queue prefixes and tables.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}
