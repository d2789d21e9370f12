//! Code shared by the server and the load-test client: the line codec and the protocol types
//! (no I/O), and the TLS session driver both sides run in their mio loops.
pub mod bank;
pub mod codec;
pub mod fsync;
pub mod queue;
pub mod tls;
