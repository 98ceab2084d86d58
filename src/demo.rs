//! stub
use tokio_util::sync::CancellationToken;
pub async fn run_sandbox(
    _l: std::net::SocketAddr,
    _p: usize,
    _s: u64,
    _t: CancellationToken,
) -> anyhow::Result<()> {
    Ok(())
}
pub async fn run_demo(
    _s: crate::config::Settings,
    _d: Option<std::path::PathBuf>,
    _p: usize,
) -> anyhow::Result<()> {
    Ok(())
}
