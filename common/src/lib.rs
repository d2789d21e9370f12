//! Code shared by the server and the load-test client: the line codec and the protocol types.
pub mod bank;
pub mod codec;
