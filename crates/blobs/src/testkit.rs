//! A real S3 API server for tests: the server mode of the Python
//! `moto` package (`pip install 'moto[server]'`), started on a free
//! loopback port and stopped (by its own PID) when dropped.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::BlobConfig;

/// A running `moto_server` with one bucket.
#[derive(Debug)]
pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The bucket created at start.
    pub bucket: String,
}

impl Moto {
    /// Starts the server and creates `bucket`.
    ///
    /// # Panics
    /// When `moto_server` is not installed or does not answer within
    /// 30 s: the tests that use it cannot run without it.
    #[allow(clippy::unwrap_used, clippy::missing_panics_doc)]
    pub fn start(bucket: &str) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server runs (pip install 'moto[server]')");
        let endpoint = format!("http://127.0.0.1:{port}");
        let mut moto = Self { child, endpoint, bucket: bucket.to_owned() };
        let deadline = Instant::now() + Duration::from_secs(30);
        // Create the bucket (moto takes any credentials); retried
        // until the server listens.
        loop {
            let ok = Command::new("curl")
                .args(["-sf", "-X", "PUT"])
                .arg(format!("{}/{bucket}", moto.endpoint))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return moto;
            }
            if let Ok(Some(status)) = moto.child.try_wait() {
                panic!("moto_server exited: {status}");
            }
            assert!(Instant::now() < deadline, "moto_server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The store configuration for this server and bucket.
    #[must_use]
    pub fn config(&self) -> BlobConfig {
        BlobConfig::S3 {
            bucket: self.bucket.clone(),
            endpoint: Some(self.endpoint.clone()),
            region: "us-east-1".into(),
            access_key_id: "testing".into(),
            secret_access_key: "testing".into(),
        }
    }

    /// Stops the server (the objects it held are gone with it).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}
