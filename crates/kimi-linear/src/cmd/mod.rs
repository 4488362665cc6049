//! One module per subcommand.

pub mod bench;
pub mod demo;
pub mod forward;
pub mod plan;
pub mod synth;
