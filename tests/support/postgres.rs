//! The PostgreSQL test server: `LAZARUS_TEST_POSTGRES=postgres://...` (see
//! scripts/postgres_test_server.sh). Each test gets a schema of its own, so
//! tests run in parallel and leave nothing behind.

use std::sync::atomic::{AtomicU64, Ordering};

/// The test server's URL. Without one the PostgreSQL variants are skipped
/// with a note, except in CI (`CI=true`), where that is a failure: there the
/// server must run, or the tests would silently test nothing.
pub fn server(test: &str) -> Option<String> {
    match std::env::var("LAZARUS_TEST_POSTGRES") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            let in_ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(
                !in_ci,
                "{test}: CI=true but LAZARUS_TEST_POSTGRES is not set; start a server with `eval \"$(bash scripts/postgres_test_server.sh start)\"`"
            );
            eprintln!(
                "{test}: skipped its PostgreSQL variant: LAZARUS_TEST_POSTGRES is not set (see scripts/postgres_test_server.sh)"
            );
            None
        }
    }
}

/// A schema created for one test and dropped with everything in it at the end.
pub struct Schema {
    server: String,
    name: String,
    /// The server URL with `search_path` set to this schema: what a queue opens.
    pub url: String,
}

impl Schema {
    pub fn create(server: &str) -> Schema {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!(
            "lazarus_test_{}_{}_{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut client = postgres::Client::connect(server, postgres::NoTls)
            .unwrap_or_else(|e| panic!("cannot reach the test server {server}: {e}"));
        client
            .batch_execute(&format!("CREATE SCHEMA {name}"))
            .unwrap();
        let separator = if server.contains('?') { '&' } else { '?' };
        let url = format!("{server}{separator}options=-c%20search_path%3D{name}");
        Schema {
            server: server.to_string(),
            name,
            url,
        }
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        if let Ok(mut client) = postgres::Client::connect(&self.server, postgres::NoTls) {
            let _ = client.batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name));
        }
    }
}
