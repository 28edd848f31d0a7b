//! A shutdown signal that every long-running task takes, so servers and
//! followers stop when their owner says so (and tests can stop them).

use tokio::sync::watch;

/// The receiving side: clone it into every task.
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<bool>);

/// The firing side.
#[derive(Debug)]
pub struct ShutdownTrigger(watch::Sender<bool>);

/// A new trigger and its signal.
pub fn shutdown_channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), Shutdown(rx))
}

impl ShutdownTrigger {
    pub fn fire(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    /// Resolves once the trigger fired. A dropped trigger never fires.
    pub async fn wait(&mut self) {
        if self.0.wait_for(|v| *v).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    pub fn is_fired(&self) -> bool {
        *self.0.borrow()
    }

    /// A `'static` future for `axum::serve(..).with_graceful_shutdown`.
    pub async fn signal(mut self) {
        self.wait().await
    }
}
