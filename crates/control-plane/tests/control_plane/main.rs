//! Control-plane tests that need no runtime: the OpenAPI document snapshot.

mod openapi;
