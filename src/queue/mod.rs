//! The job queue (issue 3). Payloads are opaque to it.
