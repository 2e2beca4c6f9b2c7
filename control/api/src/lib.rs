//! Generated types and gRPC stubs for `trellis.v1` (see proto/trellis/v1/mesh.proto).
#![allow(clippy::all, missing_docs)]
tonic::include_proto!("trellis.v1");

mod assembler;
pub use assembler::{Assembler, Interleaved};

/// The largest gRPC message control and agents send or accept, set on both ends (tonic's default
/// of 4 MiB is too small for one service that carries a large VirtualService). Control splits
/// updates into messages of about 64 KiB of resources, so only a single resource larger than this (minus a
/// little room for the envelope) cannot be delivered; control reports it per node.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

impl Protocol {
    /// HTTP/1.1, HTTP/2 and gRPC ports are proxied per request (L7); others per connection.
    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Http2 | Protocol::Grpc)
    }
}
