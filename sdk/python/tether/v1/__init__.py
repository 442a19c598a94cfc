"""Generated protobuf and gRPC code for tether.v1 (made by `make protos`; do not edit)."""
