//! Where a manifest or blob lives.

/// Where a manifest or blob lives: a local path or an HTTP(S) URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A local file.
    Path(std::path::PathBuf),
    /// An http:// or https:// URL.
    Url(String),
}

impl Location {
    /// Parse a command-line argument.
    pub fn parse(s: &str) -> Location {
        if s.starts_with("http://") || s.starts_with("https://") {
            Location::Url(s.to_string())
        } else {
            Location::Path(s.into())
        }
    }

    /// The location of `name` next to this one (in the same directory).
    pub fn sibling(&self, name: &str) -> Location {
        match self {
            Location::Path(p) => Location::Path(
                p.parent()
                    .map(|d| d.join(name))
                    .unwrap_or_else(|| name.into()),
            ),
            Location::Url(u) => {
                let base = u.split(['?', '#']).next().unwrap_or(u);
                let dir = match base.rfind('/') {
                    Some(i) if i > base.find("://").map_or(0, |j| j + 2) => &base[..=i],
                    _ => base,
                };
                let sep = if dir.ends_with('/') { "" } else { "/" };
                Location::Url(format!("{dir}{sep}{name}"))
            }
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Path(p) => write!(f, "{}", p.display()),
            Location::Url(u) => write!(f, "{u}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sibling_locations() {
        assert_eq!(
            Location::parse("http://h:1/a/b/manifest?x=1").sibling("blob"),
            Location::Url("http://h:1/a/b/blob".into())
        );
        assert_eq!(
            Location::parse("http://h:1").sibling("blob"),
            Location::Url("http://h:1/blob".into())
        );
        assert_eq!(
            Location::parse("/x/y/manifest").sibling("blob"),
            Location::Path("/x/y/blob".into())
        );
    }
}
