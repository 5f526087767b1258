//! One module per scenario; each returns its rows.

pub mod fanout;
pub mod get;
pub mod heal;
pub mod load;
pub mod output;
pub mod records;
pub mod spawn;
