//! Generated types and gRPC stubs for `trellis.v1` (see proto/trellis/v1/mesh.proto).
#![allow(clippy::all, missing_docs)]
tonic::include_proto!("trellis.v1");
