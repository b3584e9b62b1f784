"""The kubelet device-plugin API v1beta1: ``api.proto`` (vslice's own, wire-compatible with
kubelet) and the modules ``make protos`` generates from it (``api_pb2``, ``api_pb2_grpc``),
committed so that running the node agent needs no protobuf compiler."""
