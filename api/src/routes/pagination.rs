//! Cursor pagination as the lists show it: `pageSize` (1–100, default 50) and `pageToken`, the
//! `nextPageToken` of the previous page. A token is the last id of that page (a ULID, so pages
//! follow creation order and stay stable while rows are added), in URL-safe base64 so callers
//! treat it as opaque and the format can change without breaking them.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use shared::{Error, Result};
use ulid::Ulid;

pub const DEFAULT_PAGE_SIZE: i64 = 50;
pub const MAX_PAGE_SIZE: i64 = 100;

/// A validated page request.
pub struct Page {
    pub size: i64,
    /// The id the page starts after.
    pub after: Option<String>,
}

impl Page {
    /// Validates `pageSize` and decodes `pageToken`; either wrong is 400 naming the field.
    pub fn parse(page_size: Option<i64>, page_token: Option<&str>) -> Result<Page> {
        let size = page_size.unwrap_or(DEFAULT_PAGE_SIZE);
        if !(1..=MAX_PAGE_SIZE).contains(&size) {
            return Err(Error::invalid_field(
                "pageSize",
                format!("pageSize must be between 1 and {MAX_PAGE_SIZE}"),
            ));
        }
        let after = page_token
            .map(|t| {
                URL_SAFE_NO_PAD
                    .decode(t)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .filter(|id| Ulid::from_string(id).is_ok())
                    .ok_or_else(|| Error::invalid_field("pageToken", "pageToken is not valid"))
            })
            .transpose()?;
        Ok(Page { size, after })
    }

    /// How many rows to read: one more than the page, to learn whether another page follows.
    pub fn limit(&self) -> i64 {
        self.size + 1
    }

    /// Cuts `rows` (read with [`Page::limit`]) to the page; answers the next page's token.
    pub fn finish<T>(&self, rows: &mut Vec<T>, id: impl Fn(&T) -> &str) -> Option<String> {
        let size = usize::try_from(self.size).unwrap_or(usize::MAX);
        if rows.len() > size {
            rows.truncate(size);
            rows.last().map(|row| URL_SAFE_NO_PAD.encode(id(row)))
        } else {
            None
        }
    }
}
