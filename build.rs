//! Build script: rebuilds the crate when a migration is added or changed, since
//! `sqlx::migrate!` embeds the `migrations` folders at compile time and cargo does not
//! watch them on its own.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
