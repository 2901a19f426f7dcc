//! The magnus bindings: the only code that touches the Ruby VM. Every entry
//! point here runs on a Ruby thread holding the GVL (or releases it through
//! `nogvl`); tokio threads never come here.

mod delivery;
mod errors;
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
    machine::define(ruby, &native)?;
    Ok(())
}
