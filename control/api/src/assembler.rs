//! Gathers the messages of one config update: control splits a large update over several, all
//! with its version, every one but the last with `more` set. The agent and the control bench's
//! simulated agents both use it.
use crate::ConfigUpdate;

#[derive(Debug, Default)]
pub struct Assembler {
    pending: Option<ConfigUpdate>,
}

/// A message of another update arrived before the one being gathered ended.
#[derive(Debug, PartialEq)]
pub struct Interleaved {
    pub got: u64,
    pub pending: u64,
}

impl std::fmt::Display for Interleaved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "control sent version {} before finishing version {}",
            self.got, self.pending
        )
    }
}

impl std::error::Error for Interleaved {}

impl Assembler {
    /// Adds one message; returns the whole update once its last message has arrived.
    pub fn push(&mut self, msg: ConfigUpdate) -> Result<Option<ConfigUpdate>, Interleaved> {
        let whole = match self.pending.take() {
            None => msg,
            Some(mut update) => {
                if (msg.version, msg.snapshot) != (update.version, update.snapshot) {
                    return Err(Interleaved {
                        got: msg.version,
                        pending: update.version,
                    });
                }
                update.upserts.extend(msg.upserts);
                update.removals.extend(msg.removals);
                update.more = msg.more;
                update
            }
        };
        if whole.more {
            self.pending = Some(whole);
            return Ok(None);
        }
        Ok(Some(whole))
    }
}
