//! `basalt token`: join tokens for new nodes. `create` prints the secret
//! once (the control plane keeps only its hash); `list` and `revoke`
//! manage the rest.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use basalt_api::{AdminClient, ApiError, JoinToken, Kind, Object, ObjectMeta};

use crate::output::{self, Format};

/// What to do with join tokens.
#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Create a join token and print its secret (shown only this once).
    Create {
        /// The token's name (default: `token-` and a time-derived suffix).
        #[arg(long)]
        name: Option<String>,
        /// How long it is valid: a number with s, m, h or d (e.g. 90m).
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
        /// How many nodes may register with it (0 = unlimited).
        #[arg(long, default_value_t = 1)]
        uses: u32,
    },
    /// List join tokens (never their secrets).
    #[command(visible_alias = "ls")]
    List,
    /// Revoke a join token: no more registrations with it.
    Revoke {
        /// The token's name.
        name: String,
    },
}

/// Parses `90s`, `15m`, `1h`, `7d` (or plain seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 90s, 15m, 1h or 7d"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}; use s, m, h or d"
            ));
        }
    };
    if value == 0 {
        return Err("a token must be valid for at least 1 s".into());
    }
    Ok(Duration::from_secs(value.saturating_mul(seconds)))
}

fn default_name() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("token-{:08x}", (nanos / 1_000) as u32)
}

/// Runs one `basalt token` command against the server at `server`.
pub async fn run(server: &str, format: Format, command: TokenCommand) -> anyhow::Result<()> {
    let client = AdminClient::connect(server).await?;
    match command {
        TokenCommand::Create { name, ttl, uses } => {
            let mut token = JoinToken {
                meta: ObjectMeta::named(name.unwrap_or_else(default_name)),
                ..JoinToken::default()
            };
            token.spec.ttl_seconds = ttl.as_secs();
            token.spec.max_uses = uses;
            let object = Object::Token(token);
            object.validate()?;
            let created = client
                .create(object)
                .await
                .context("creating the join token")?;
            let Object::Token(token) = &created else {
                bail!(
                    "the server answered a token create with a {}",
                    created.kind()
                );
            };
            let Some(secret) = &token.secret else {
                bail!("the server returned no secret for the new token");
            };
            match format {
                Format::Table => {
                    println!(
                        "token/{} created: valid for {} s, {} use(s)",
                        token.meta.name,
                        token.spec.ttl_seconds,
                        if uses == 0 {
                            "unlimited".to_owned()
                        } else {
                            uses.to_string()
                        }
                    );
                    println!("secret (shown only now): {secret}");
                    Ok(())
                }
                _ => output::print_objects(format, Kind::Token, std::slice::from_ref(&created)),
            }
        }
        TokenCommand::List => {
            let list = client.list(Kind::Token).await?;
            output::print_objects(format, Kind::Token, &list.objects)
        }
        TokenCommand::Revoke { name } => loop {
            let Object::Token(mut token) = client.get(Kind::Token, &name).await? else {
                bail!("token/{name} is not a token");
            };
            if token.spec.revoked {
                println!("token/{name} was already revoked");
                return Ok(());
            }
            token.spec.revoked = true;
            match client.update(Object::Token(token)).await {
                Ok(_) => {
                    println!("token/{name} revoked");
                    return Ok(());
                }
                // Used meanwhile: read it again.
                Err(ApiError::Aborted { .. }) => continue,
                Err(err) => return Err(err).context(format!("revoking token/{name}")),
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_unit() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert!(parse_duration("1w").unwrap_err().contains("unit"));
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("0s").is_err());
    }
}
