//! Rebuild when a migration is added: `sqlx::migrate!` embeds the migrations folder at compile
//! time, and cargo does not watch that folder on its own (sqlx's documented advice).
fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
