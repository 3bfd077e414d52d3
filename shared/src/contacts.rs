//! Which numbers are on WhatsApp: `POST /sessions/{session}/contacts:check`.
//!
//! WhatsApp answers this through a session's own connection, and bans numbers that check
//! others in bulk, so a session checks few numbers at a time ([`MAX_NUMBERS`]), the answers
//! are cached (`contact_checks`, by session and number) and the numbers a session checks
//! against WhatsApp are held to a rate of their own (the api's `CONTACT_CHECKS_PER_HOUR`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{
    error::{Error, Result},
    session::normalize_phone_number,
};

/// The most numbers one request checks.
pub const MAX_NUMBERS: usize = 50;

/// What WhatsApp said of one number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NumberCheck {
    /// The number asked about, as digits with its country code.
    #[schema(example = "6281234567890")]
    pub number: String,
    #[serde(rename = "onWhatsApp")]
    pub on_whatsapp: bool,
    /// Its account's JID, when it is on WhatsApp.
    #[schema(example = "6281234567890@s.whatsapp.net")]
    pub jid: Option<String>,
    /// Its account's LID, when WhatsApp says.
    pub lid: Option<String>,
}

/// The numbers of a request, as digits, each once, in the order given: 1 to
/// [`MAX_NUMBERS`] phone numbers with their country codes.
pub fn normalize_numbers(numbers: &[String]) -> Result<Vec<String>> {
    if numbers.is_empty() || numbers.len() > MAX_NUMBERS {
        return Err(Error::invalid_field(
            "numbers",
            format!("numbers must hold 1 to {MAX_NUMBERS} phone numbers"),
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(numbers.len());
    for n in numbers {
        let digits = normalize_phone_number(n).map_err(|_| {
            Error::invalid_field(
                "numbers",
                format!("'{n}' is not a phone number with its country code (7 to 15 digits)"),
            )
        })?;
        if !out.contains(&digits) {
            out.push(digits);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_digits_each_once_and_bounded() {
        let given = ["+62 812-3456-7890", "6281234567890", "(1) 555 0000"].map(String::from);
        assert_eq!(
            normalize_numbers(&given).ok(),
            Some(vec!["6281234567890".into(), "15550000".into()])
        );
        assert!(normalize_numbers(&[]).is_err());
        assert!(normalize_numbers(&["12".into()]).is_err());
        assert!(normalize_numbers(&vec!["6281234567890".into(); MAX_NUMBERS + 1]).is_err());
    }
}
