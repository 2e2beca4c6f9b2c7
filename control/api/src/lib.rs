//! Generated types and gRPC stubs for `trellis.v1` (see proto/trellis/v1/mesh.proto).
#![allow(clippy::all, missing_docs)]
tonic::include_proto!("trellis.v1");

impl Protocol {
    /// HTTP/1.1, HTTP/2 and gRPC ports are proxied per request (L7); others per connection.
    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Http2 | Protocol::Grpc)
    }
}
