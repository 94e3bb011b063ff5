//! Task events, in the order containerd requires.
//!
//! Every event goes through one channel to one forwarding task, so that the order in which the
//! service emits them (create → start → exit → delete; exec-added → exec-started → exit) is the
//! order containerd receives them.

use containerd_shim::{Context, protos::protobuf::MessageDyn, publisher::RemotePublisher};
use tokio::sync::mpsc;

/// One event: its topic and payload.
pub type Event = (&'static str, Box<dyn MessageDyn>);

/// Where the service sends its events.
#[derive(Clone, Debug)]
pub struct EventSink(mpsc::UnboundedSender<Event>);

impl EventSink {
    /// A sink and the receiving end that must be forwarded (or, in tests, read).
    pub fn new() -> (Self, mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self(tx), rx)
    }

    /// Queues an event.
    pub fn send(&self, topic: &'static str, event: impl MessageDyn) {
        if self.0.send((topic, Box::new(event))).is_err() {
            tracing::warn!(topic, "event dropped: the forwarder has stopped");
        }
    }
}

/// Forwards events to containerd one at a time, in order.
pub fn forward(
    publisher: RemotePublisher,
    namespace: String,
    mut rx: mpsc::UnboundedReceiver<Event>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some((topic, event)) = rx.recv().await {
            if let Err(e) = publisher
                .publish(Context::default(), topic, &namespace, event)
                .await
            {
                tracing::error!(topic, error = %e, "publish event");
            }
        }
    })
}
