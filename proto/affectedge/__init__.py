"""AffectEdge wire contract: the protobuf messages (``affectedge.v1``) and the label vocabulary."""
