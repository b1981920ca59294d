//! Control-plane tests: the OpenAPI document snapshot, and warm pools against
//! an in-process server with the real providers.

mod openapi;
mod pools;
mod support;
