//! URLs in logs and messages: never with credentials or signed query strings.

/// `https://user:pw@host/p?sig=x` -> `https://host/p?<redacted>`.
pub fn url(raw: &str) -> String {
    match reqwest::Url::parse(raw) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            let had_query = u.query().is_some();
            u.set_query(None);
            let mut s = u.to_string();
            if had_query {
                s.push_str("?<redacted>");
            }
            s
        }
        Err(_) => "<unparsable url>".to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn strips_credentials_and_query() {
        assert_eq!(
            super::url("https://u:secret@h:8/a/b.img?X-Amz-Signature=s"),
            "https://h:8/a/b.img?<redacted>"
        );
        assert_eq!(super::url("http://h/x"), "http://h/x");
        assert!(!super::url("not a url secret").contains("secret"));
    }
}
