//! Generated protobuf and gRPC code for `multilora.v1`.
#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("multilora.v1");
}

/// The encoded descriptor set, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/multilora_descriptor.bin"));
