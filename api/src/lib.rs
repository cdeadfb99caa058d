//! The Basalt API contract (protobuf services, domain types, conversions).
//! Being written under the foundation issue.
