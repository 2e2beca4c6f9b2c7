#![no_std]
// Exists so the agent can build-depend on this crate (cargo then rebuilds it on changes).
