//! The magnus bindings: the only code that touches the Ruby VM. Every entry
//! point here runs on a Ruby thread holding the GVL (or releases it through
//! `nogvl`); tokio threads never come here.
//!
//! - `native`: the `Native` module functions (thin: parse, hand over).
//! - `exchange_spec`: the one reader of the Hash Ruby's `ExchangeSpec`
//!   writes (start_exchange, async_enqueue).
//! - `args`: reading option Hashes (required, optional, seconds) and
//!   duplicating a descriptor Ruby lends.
//! - `job`: `Native::Job`, one callback request, answered by named replies
//!   (`pass`, `amend`, `render`, `render_file`, `fail`).
//! - `delivery`: `Native.async_*` (proxy_async).
//! - `events`: `Native.stream_events`/`publish`/`subscribers` (event streams).
//! - `machine`: `Native::Machine`, `Native::MachineJob` (the TCP router).
//! - `errors`: Rust errors as Ruby exceptions; `nogvl`: GVL release.

mod args;
mod delivery;
mod errors;
mod events;
mod exchange_spec;
mod job;
mod machine;
mod native;
mod nogvl;

use magnus::{Error, Module, Ruby};

pub fn init(ruby: &Ruby) -> Result<(), Error> {
    let root = ruby.define_module("ThreadedProxy")?;
    let native = root.define_module("Native")?;
    native::define(&native)?;
    job::define(ruby, &native)?;
    delivery::define(&native)?;
    events::define(&native)?;
    machine::define(ruby, &native)?;
    Ok(())
}
