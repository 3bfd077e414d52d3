//! Polls: the question a session asks ([`Poll`]), and a contact's vote on one
//! ([`PollVote`]).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::content::validate_message_id;
use crate::error::{Error, Result};

/// A vote on a poll: the poll, by our id, and the options chosen, in the poll's order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PollVote {
    /// Our id of the poll voted on.
    pub message_id: String,
    /// The names of the options chosen; empty when the vote was taken back.
    #[schema(max_items = 12)]
    pub options: Vec<String>,
}

impl PollVote {
    pub(super) fn validate(&self) -> Result<()> {
        validate_message_id("poll_vote.messageId", &self.message_id)?;
        if self.options.len() > POLL_MAX_OPTIONS
            || self
                .options
                .iter()
                .any(|o| o.chars().count() > POLL_OPTION_MAX_CHARS || o.contains('\0'))
        {
            return Err(Error::invalid_field(
                "poll_vote.options",
                format!(
                    "a vote names at most {POLL_MAX_OPTIONS} options of at most \
                     {POLL_OPTION_MAX_CHARS} characters"
                ),
            ));
        }
        Ok(())
    }
}

/// A question with 2–12 options, of which a contact may choose up to `selectableCount`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Poll {
    /// The question, 1–255 characters.
    #[schema(min_length = 1, max_length = 255)]
    pub name: String,
    /// 2–12 distinct options, 1–100 characters each.
    #[schema(min_items = 2, max_items = 12)]
    pub options: Vec<String>,
    /// How many options a contact may choose: 1 (the default) to all of them.
    #[serde(default = "Poll::one")]
    #[schema(minimum = 1, maximum = 12, default = 1)]
    pub selectable_count: u32,
}

impl Poll {
    fn one() -> u32 {
        1
    }

    pub(super) fn validate(&self) -> Result<()> {
        let chars = |s: &str| s.chars().count();
        if self.name.trim().is_empty() || chars(&self.name) > POLL_NAME_MAX_CHARS {
            return Err(Error::invalid_field(
                "poll.name",
                format!("poll.name must be 1 to {POLL_NAME_MAX_CHARS} characters"),
            ));
        }
        if !(2..=POLL_MAX_OPTIONS).contains(&self.options.len()) {
            return Err(Error::invalid_field(
                "poll.options",
                format!("poll.options must hold 2 to {POLL_MAX_OPTIONS} options"),
            ));
        }
        for (i, option) in self.options.iter().enumerate() {
            if option.trim().is_empty() || chars(option) > POLL_OPTION_MAX_CHARS {
                return Err(Error::invalid_field(
                    "poll.options",
                    format!("each of poll.options must be 1 to {POLL_OPTION_MAX_CHARS} characters"),
                ));
            }
            if self.options[..i].contains(option) {
                return Err(Error::invalid_field(
                    "poll.options",
                    format!(
                        "poll.options names '{option}' twice: a vote could not tell them apart"
                    ),
                ));
            }
        }
        if self.selectable_count < 1 || self.selectable_count as usize > self.options.len() {
            return Err(Error::invalid_field(
                "poll.selectableCount",
                "poll.selectableCount must be between 1 and the number of options",
            ));
        }
        if self.name.contains('\0') || self.options.iter().any(|o| o.contains('\0')) {
            return Err(Error::invalid_field("poll", "a poll must not contain NUL"));
        }
        Ok(())
    }
}

/// The longest question of a poll, in characters.
pub const POLL_NAME_MAX_CHARS: usize = 255;
/// The most options a poll may offer (WhatsApp's limit).
pub const POLL_MAX_OPTIONS: usize = 12;
/// The longest option of a poll, in characters.
pub const POLL_OPTION_MAX_CHARS: usize = 100;
