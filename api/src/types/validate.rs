//! Field rules shared by the domain types' `validate` methods.

use std::collections::BTreeMap;

use crate::ApiError;

/// Longest name, label key or label value.
pub(crate) const MAX_NAME_LEN: usize = 63;

/// Checks that `name` is a DNS label: 1–63 characters of lowercase ASCII
/// letters, digits and '-', starting and ending with a letter or digit.
pub(crate) fn name(field: &str, name: &str) -> Result<(), ApiError> {
    if name.is_empty() {
        return Err(ApiError::invalid(field, "must not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(ApiError::invalid(
            field,
            format!(
                "must be at most {MAX_NAME_LEN} characters, got {}",
                name.len()
            ),
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(ApiError::invalid(
            field,
            format!("{name:?} may hold only lowercase letters, digits and '-'"),
        ));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(ApiError::invalid(
            field,
            format!("{name:?} must start and end with a letter or digit"),
        ));
    }
    Ok(())
}

/// Checks label keys and values: a key is 1–63 characters of ASCII
/// letters, digits, '-', '_', '.' and '/'; a value is at most 63 characters
/// of the same set (and may be empty).
pub(crate) fn labels(field: &str, labels: &BTreeMap<String, String>) -> Result<(), ApiError> {
    let allowed = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
    };
    for (key, value) in labels {
        let at = format!("{field}[{key:?}]");
        if key.is_empty() || key.len() > MAX_NAME_LEN || !allowed(key) {
            return Err(ApiError::invalid(
                at,
                "a label key is 1-63 characters of letters, digits, '-', '_', '.' and '/'",
            ));
        }
        if value.len() > MAX_NAME_LEN || !allowed(value) {
            return Err(ApiError::invalid(
                at,
                "a label value is at most 63 characters of letters, digits, '-', '_', '.' and '/'",
            ));
        }
    }
    Ok(())
}

/// Checks that a condition type or reason is a non-empty identifier.
pub(crate) fn identifier(field: &str, value: &str) -> Result<(), ApiError> {
    if value.is_empty() || value.len() > 128 {
        return Err(ApiError::invalid(field, "must be 1-128 characters"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(ApiError::invalid(
            field,
            format!("{value:?} may hold only letters, digits and '_'"),
        ));
    }
    Ok(())
}

/// Checks a "host:port" address.
pub(crate) fn address(field: &str, address: &str) -> Result<(), ApiError> {
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(ApiError::invalid(
            field,
            format!("{address:?} is not \"host:port\""),
        ));
    };
    if host.is_empty() || host.chars().any(char::is_whitespace) {
        return Err(ApiError::invalid(
            field,
            format!("{address:?} has no valid host"),
        ));
    }
    if port.parse::<u16>().map_or(true, |port| port == 0) {
        return Err(ApiError::invalid(
            field,
            format!("{address:?} has no valid port"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_dns_labels() {
        for good in ["a", "vm-1", "0", &"x".repeat(63)] {
            assert_eq!(name("meta.name", good), Ok(()), "{good:?}");
        }
        for bad in [
            "",
            "Vm",
            "vm_1",
            "-vm",
            "vm-",
            "vm.1",
            "vé",
            &"x".repeat(64),
        ] {
            let err = name("meta.name", bad).expect_err(bad);
            assert!(
                matches!(&err, ApiError::InvalidArgument { field, .. } if field == "meta.name"),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn addresses_need_host_and_port() {
        assert_eq!(address("a", "10.0.0.1:7000"), Ok(()));
        assert_eq!(address("a", "[::1]:7000"), Ok(()));
        assert_eq!(address("a", "node-1:1"), Ok(()));
        for bad in [
            "",
            "10.0.0.1",
            ":7000",
            "host:0",
            "host:70000",
            "host:x",
            "a b:1",
        ] {
            assert!(address("a", bad).is_err(), "{bad:?}");
        }
    }
}
