//! Control-plane tests: the OpenAPI document snapshot, warm pools against
//! an in-process server with the real providers, and the control plane's
//! own logic against the fake provider.

mod logic;
mod openapi;
mod pools;
mod support;
