//! One small SQL interface over the two main-store engines: SQLite (embedded default) and
//! PostgreSQL (production). The store writes its SQL once, with `?1`-style placeholders and
//! portable syntax; this module rewrites placeholders for PostgreSQL and converts values.
//!
//! Values are the four kinds the schema uses: integers (every number column is 64-bit),
//! text, bytes and NULL. Booleans are stored as 0/1 integers on both engines.

use super::{Result, StoreError};
use postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use std::collections::HashMap;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

impl From<i64> for Value {
    fn from(v: i64) -> Value {
        Value::Int(v)
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value::Int(i64::from(v))
    }
}
impl From<u8> for Value {
    fn from(v: u8) -> Value {
        Value::Int(i64::from(v))
    }
}
impl From<u16> for Value {
    fn from(v: u16) -> Value {
        Value::Int(i64::from(v))
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Value {
        Value::Text(v.to_owned())
    }
}
impl From<&String> for Value {
    fn from(v: &String) -> Value {
        Value::Text(v.clone())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Value {
        Value::Text(v)
    }
}
impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Value {
        Value::Blob(v.to_vec())
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Value {
        v.map_or(Value::Null, Into::into)
    }
}

/// `vals![a, b, ..]`: arguments for a statement.
macro_rules! vals {
    ($($v:expr),* $(,)?) => { &[$($crate::store::db::Value::from($v)),*][..] };
}
pub(crate) use vals;

impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(i) if *ty == Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
            Value::Int(i) if *ty == Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
            Value::Int(i) => i.to_sql(ty, out),
            Value::Text(s) => s.to_sql(ty, out),
            Value::Blob(b) => b.as_slice().to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// One result row, its columns converted to `Value`s.
#[derive(Debug)]
pub struct Row(Vec<Value>);

impl Row {
    fn bad(&self, i: usize, want: &str) -> StoreError {
        StoreError::Invalid(format!(
            "column {i}: expected {want}, found {:?}",
            self.0.get(i)
        ))
    }

    pub fn i64(&self, i: usize) -> Result<i64> {
        match self.0.get(i) {
            Some(Value::Int(v)) => Ok(*v),
            _ => Err(self.bad(i, "an integer")),
        }
    }

    pub fn opt_i64(&self, i: usize) -> Result<Option<i64>> {
        match self.0.get(i) {
            Some(Value::Null) => Ok(None),
            _ => self.i64(i).map(Some),
        }
    }

    /// A small integer column (feature numbers, state codes, masks).
    pub fn int<T: TryFrom<i64>>(&self, i: usize) -> Result<T> {
        T::try_from(self.i64(i)?).map_err(|_| self.bad(i, "a value in range"))
    }

    pub fn opt_int<T: TryFrom<i64>>(&self, i: usize) -> Result<Option<T>> {
        match self.opt_i64(i)? {
            None => Ok(None),
            Some(v) => T::try_from(v)
                .map(Some)
                .map_err(|_| self.bad(i, "a value in range")),
        }
    }

    pub fn text(&self, i: usize) -> Result<String> {
        match self.0.get(i) {
            Some(Value::Text(v)) => Ok(v.clone()),
            _ => Err(self.bad(i, "text")),
        }
    }

    pub fn opt_text(&self, i: usize) -> Result<Option<String>> {
        match self.0.get(i) {
            Some(Value::Null) => Ok(None),
            _ => self.text(i).map(Some),
        }
    }

    pub fn blob(&self, i: usize) -> Result<Vec<u8>> {
        match self.0.get(i) {
            Some(Value::Blob(v)) => Ok(v.clone()),
            _ => Err(self.bad(i, "bytes")),
        }
    }
}

/// Which engine a connection talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

pub enum Db {
    Sqlite(rusqlite::Connection),
    Postgres(Box<Pg>),
}

/// Prepared statements kept per PostgreSQL connection, at most (each holds memory in the
/// server's backend too).
const PG_STATEMENTS: usize = 256;

/// SQLite's prepared-statement cache per connection (rusqlite keeps 16 by default; the
/// store's statements, with the batched ones in their few sizes, number about a hundred).
pub const SQLITE_STATEMENTS: usize = 128;

pub struct Pg {
    /// Always `Some` until drop.
    client: Option<postgres::Client>,
    /// Prepared statements by their (rewritten) text: the store's SQL is a small set (its
    /// batched statements come in a few sizes), kept below `PG_STATEMENTS`.
    statements: HashMap<String, postgres::Statement>,
}

impl Drop for Pg {
    /// Closing the connection blocks on the client's own runtime, which panics on an async
    /// worker (a `Ctx` dropped there): close it on a plain thread then.
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                let _ = std::thread::Builder::new()
                    .name("keygate-pg-close".into())
                    .spawn(move || drop(client));
            }
        }
    }
}

impl Pg {
    pub fn new(client: postgres::Client) -> Pg {
        Pg {
            client: Some(client),
            statements: HashMap::new(),
        }
    }

    /// Statements prepared and kept on this connection (tests).
    #[cfg(test)]
    pub fn prepared(&self) -> usize {
        self.statements.len()
    }

    pub fn client(&mut self) -> &mut postgres::Client {
        self.client.as_mut().expect("the client lives until drop")
    }

    fn statement(&mut self, sql: &str) -> Result<postgres::Statement> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let pg_sql = placeholders_for_postgres(sql);
        let st = self.client().prepare(&pg_sql)?;
        if self.statements.len() >= PG_STATEMENTS {
            // A bound, not a working set: dropped statements are closed on the server, and
            // the next use of each prepares it again.
            self.statements.clear();
        }
        self.statements.insert(sql.to_owned(), st.clone());
        Ok(st)
    }
}

/// `?1` → `$1`. The store's SQL never holds a `?` inside a string literal.
pub fn placeholders_for_postgres(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(|n| n.is_ascii_digit()) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

fn sqlite_value(v: &Value) -> rusqlite::types::ToSqlOutput<'_> {
    use rusqlite::types::{ToSqlOutput, ValueRef};
    ToSqlOutput::Borrowed(match v {
        Value::Null => ValueRef::Null,
        Value::Int(i) => ValueRef::Integer(*i),
        Value::Text(s) => ValueRef::Text(s.as_bytes()),
        Value::Blob(b) => ValueRef::Blob(b),
    })
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(sqlite_value(self))
    }
}

fn sqlite_row(r: &rusqlite::Row<'_>, columns: usize) -> Result<Row> {
    use rusqlite::types::ValueRef;
    let mut out = Vec::with_capacity(columns);
    for i in 0..columns {
        out.push(match r.get_ref(i)? {
            ValueRef::Null => Value::Null,
            ValueRef::Integer(v) => Value::Int(v),
            ValueRef::Real(v) => Value::Int(v as i64),
            ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
            ValueRef::Blob(b) => Value::Blob(b.to_vec()),
        });
    }
    Ok(Row(out))
}

fn pg_row(r: &postgres::Row) -> Result<Row> {
    let mut out = Vec::with_capacity(r.len());
    for (i, c) in r.columns().iter().enumerate() {
        let ty = c.type_();
        let v = if *ty == Type::VOID {
            None
        } else if *ty == Type::INT8 {
            r.try_get::<_, Option<i64>>(i)?.map(Value::Int)
        } else if *ty == Type::INT4 {
            r.try_get::<_, Option<i32>>(i)?
                .map(|v| Value::Int(i64::from(v)))
        } else if *ty == Type::INT2 {
            r.try_get::<_, Option<i16>>(i)?
                .map(|v| Value::Int(i64::from(v)))
        } else if *ty == Type::BOOL {
            r.try_get::<_, Option<bool>>(i)?
                .map(|v| Value::Int(i64::from(v)))
        } else if *ty == Type::BYTEA {
            r.try_get::<_, Option<Vec<u8>>>(i)?.map(Value::Blob)
        } else {
            r.try_get::<_, Option<String>>(i)?.map(Value::Text)
        };
        out.push(v.unwrap_or(Value::Null));
    }
    Ok(Row(out))
}

fn pg_args(args: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
    args.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
}

impl Db {
    pub fn engine(&self) -> Engine {
        match self {
            Db::Sqlite(_) => Engine::Sqlite,
            Db::Postgres(_) => Engine::Postgres,
        }
    }

    /// Runs statements without arguments (schema scripts, transaction control).
    pub fn batch(&mut self, sql: &str) -> Result<()> {
        match self {
            Db::Sqlite(c) => c.execute_batch(sql)?,
            Db::Postgres(p) => p.client().batch_execute(sql)?,
        }
        Ok(())
    }

    /// Runs one statement; returns the rows it changed.
    pub fn exec(&mut self, sql: &str, args: &[Value]) -> Result<usize> {
        match self {
            Db::Sqlite(c) => Ok(c
                .prepare_cached(sql)?
                .execute(rusqlite::params_from_iter(args.iter()))?),
            Db::Postgres(p) => {
                let st = p.statement(sql)?;
                Ok(p.client().execute(&st, &pg_args(args))? as usize)
            }
        }
    }

    /// Calls `each` for every row, streaming: the rows are never all in memory at once.
    pub fn for_each(
        &mut self,
        sql: &str,
        args: &[Value],
        mut each: impl FnMut(Row) -> Result<()>,
    ) -> Result<()> {
        match self {
            Db::Sqlite(c) => {
                let mut st = c.prepare_cached(sql)?;
                let columns = st.column_count();
                let mut rows = st.query(rusqlite::params_from_iter(args.iter()))?;
                while let Some(r) = rows.next()? {
                    each(sqlite_row(r, columns)?)?;
                }
            }
            Db::Postgres(p) => {
                use postgres::fallible_iterator::FallibleIterator;
                let st = p.statement(sql)?;
                let mut rows = p.client().query_raw(&st, args.iter())?;
                while let Some(r) = rows.next()? {
                    each(pg_row(&r)?)?;
                }
            }
        }
        Ok(())
    }

    pub fn query(&mut self, sql: &str, args: &[Value]) -> Result<Vec<Row>> {
        let mut out = Vec::new();
        self.for_each(sql, args, |r| {
            out.push(r);
            Ok(())
        })?;
        Ok(out)
    }

    /// The first row, if any.
    pub fn query_opt(&mut self, sql: &str, args: &[Value]) -> Result<Option<Row>> {
        Ok(self.query(sql, args)?.into_iter().next())
    }

    /// The first row; an error when there is none.
    pub fn query_one(&mut self, sql: &str, args: &[Value]) -> Result<Row> {
        self.query_opt(sql, args)?
            .ok_or_else(|| StoreError::Invalid(format!("no row from: {sql}")))
    }

    /// Runs `f` in one transaction: committed when it returns `Ok`, rolled back otherwise.
    /// SQLite takes its write lock at the start (`IMMEDIATE`), so two writers never deadlock
    /// upgrading a read lock.
    pub fn transaction<T>(&mut self, f: impl FnOnce(&mut Db) -> Result<T>) -> Result<T> {
        self.batch(match self.engine() {
            Engine::Sqlite => "BEGIN IMMEDIATE",
            Engine::Postgres => "BEGIN",
        })?;
        match f(self) {
            Ok(v) => {
                if let Err(e) = self.batch("COMMIT") {
                    let _ = self.batch("ROLLBACK");
                    return Err(e);
                }
                Ok(v)
            }
            Err(e) => {
                let _ = self.batch("ROLLBACK");
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_renumbered_for_postgres_only_where_they_are_placeholders() {
        assert_eq!(
            placeholders_for_postgres("SELECT a FROM t WHERE b = ?1 AND (?2 IS NULL OR c = ?2)"),
            "SELECT a FROM t WHERE b = $1 AND ($2 IS NULL OR c = $2)"
        );
        assert_eq!(placeholders_for_postgres("?10, ?"), "$10, ?");
    }

    #[test]
    fn sqlite_rows_convert_every_kind() {
        let mut db = Db::Sqlite(rusqlite::Connection::open_in_memory().unwrap());
        let r = db
            .query_one(
                "SELECT ?1, ?2, ?3, ?4",
                vals![7_i64, "x", &b"\x00\x01"[..], None::<i64>],
            )
            .unwrap();
        assert_eq!(r.i64(0).unwrap(), 7);
        assert_eq!(r.text(1).unwrap(), "x");
        assert_eq!(r.blob(2).unwrap(), vec![0, 1]);
        assert_eq!(r.opt_i64(3).unwrap(), None);
        assert!(r.text(0).is_err());
    }
}
