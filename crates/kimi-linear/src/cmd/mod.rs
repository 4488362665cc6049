//! One module per subcommand.

pub mod bench;
pub mod chat;
pub mod demo;
pub mod forward;
pub mod plan;
pub mod run;
pub mod synth;
pub mod tokenize;
