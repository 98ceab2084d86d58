//! Group commit for the inbox: one writer task takes every delivery waiting to be stored and
//! inserts them in one transaction, then answers each request. A request is acknowledged only
//! after the transaction holding its item has committed, so durability is that of a lone insert;
//! under load many deliveries share one commit (and on SQLite one write lock) instead of
//! queueing for it. With nothing else waiting a batch is one item, so nothing waits for a timer.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::store::{InsertOutcome, NewInboxItem, Store, StoreError};

/// Most items in one transaction.
const MAX_BATCH: usize = 256;
/// Deliveries waiting for the writer before senders wait for room.
const QUEUE: usize = 4_096;

type Reply = oneshot::Sender<Result<InsertOutcome, StoreError>>;

/// A handle to the writer task; cloning it shares the task. The task ends when every handle is
/// dropped, after storing what was already queued.
#[derive(Clone)]
pub struct InboxWriter {
    queue: mpsc::Sender<(NewInboxItem, Reply)>,
}

impl InboxWriter {
    /// Starts the writer task on the current runtime.
    pub fn spawn(store: Arc<dyn Store>) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_batches(store, rx));
        Self { queue }
    }

    /// Stores `item`, returning once its transaction has committed.
    pub async fn insert(&self, item: NewInboxItem) -> Result<InsertOutcome, StoreError> {
        let (reply, answer) = oneshot::channel();
        let gone = || StoreError::Database(sqlx::Error::PoolClosed);
        self.queue.send((item, reply)).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

async fn write_batches(store: Arc<dyn Store>, mut rx: mpsc::Receiver<(NewInboxItem, Reply)>) {
    let mut waiting = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut waiting, MAX_BATCH).await > 0 {
        let (items, replies): (Vec<NewInboxItem>, Vec<Reply>) = waiting.drain(..).unzip();
        match store.insert_inbox_batch(&items).await {
            Ok(outcomes) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            // Nothing of the batch committed. Each item alone, so one failing item (or a busy
            // moment) answers only for itself.
            Err(_) if items.len() > 1 => {
                for (item, reply) in items.iter().zip(replies) {
                    let _ = reply.send(store.insert_inbox(item).await);
                }
            }
            Err(e) => {
                if let Some(reply) = replies.into_iter().next() {
                    let _ = reply.send(Err(e));
                }
            }
        }
    }
}
