//! Decoding client requests: path normalisation and the form/query parameters of each method,
//! tolerant of what real SDKs send (any casing, repeated slashes, `True`, `FriendlyName=None`,
//! `SignMethod=StringSign`, empty strings for unset values). Pure and fuzzed (`fuzz/`).

use crate::domain::LogFilter;
use std::borrow::Cow;

/// The client methods Keygate serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Activate,
    GetKey,
    Deactivate,
    CreateTrialKey,
    /// `ai/GetWebAPILog`: the calling tenant's request log.
    GetWebApiLog,
}

/// Why a path is not served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteError {
    /// Web API 2 (`/Ext/...`) paths: refused with a pointer to v3.
    Legacy,
    Unknown,
}

/// Maps a request path to a method: case-insensitive, repeated `/` collapsed, one trailing `/`
/// ignored (Python sends `/api//key/activate`, .NET `/api//key/activate/`).
pub fn route(path: &str) -> Result<Route, RouteError> {
    // Split as bytes: `str::split` with a `char` pattern costs several times more here.
    let mut segs = path
        .as_bytes()
        .split(|&b| b == b'/')
        .filter(|s| !s.is_empty());
    let first = segs.next().unwrap_or_default();
    if first.eq_ignore_ascii_case(b"ext") {
        return Err(RouteError::Legacy);
    }
    if !first.eq_ignore_ascii_case(b"api") {
        return Err(RouteError::Unknown);
    }
    let (Some(group), Some(method), None) = (segs.next(), segs.next(), segs.next()) else {
        return Err(RouteError::Unknown);
    };
    const METHODS: [(&[u8], &[u8], Route); 5] = [
        (b"key", b"activate", Route::Activate),
        (b"key", b"getkey", Route::GetKey),
        (b"key", b"deactivate", Route::Deactivate),
        (b"key", b"createtrialkey", Route::CreateTrialKey),
        (b"ai", b"getwebapilog", Route::GetWebApiLog),
    ];
    METHODS
        .iter()
        .find(|(g, n, _)| g.eq_ignore_ascii_case(group) && n.eq_ignore_ascii_case(method))
        .map(|(_, _, r)| *r)
        .ok_or(RouteError::Unknown)
}

/// A decoding failure; each maps to one Cryptolens message in `http::error`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// No `token` parameter.
    MissingToken,
    /// A required parameter is missing, or one has a value of the wrong type.
    BadParameter(&'static str),
}

/// Longest machine code, friendly name or key string accepted (CreateTrialKey has its own 128).
pub const MAX_FIELD_LEN: usize = 1024;

/// `application/x-www-form-urlencoded` pairs, exactly as `form_urlencoded::parse` yields them,
/// handed to `each` in order. What the SDKs send is mostly plain (valid UTF-8, no `%`, no
/// `+`, which one `memchr2` pass over the whole input tells): then every name and value is
/// borrowed as it is (`plain_pairs`). Input with `%` or `+` is split at each `&` with
/// `memchr`, and only the pieces that have them go through the general decoder. The
/// input is checked for UTF-8 once: the delimiters are ASCII, so every piece of valid UTF-8
/// split at them is valid too.
fn parse_into<'a>(input: &'a [u8], mut each: impl FnMut(Cow<'a, str>, Cow<'a, str>)) {
    let Ok(text) = std::str::from_utf8(input) else {
        // Not UTF-8 (hostile or broken input): the general decoder for all of it.
        form_urlencoded::parse(input).for_each(|(k, v)| each(k, v));
        return;
    };
    if memchr::memchr2(b'%', b'+', input).is_none() {
        return plain_pairs(text, each);
    }
    let bytes = text.as_bytes();
    let mut start = 0;
    while start < bytes.len() {
        let end = memchr::memchr(b'&', &bytes[start..]).map_or(bytes.len(), |i| start + i);
        let piece = &text[start..end];
        if memchr::memchr2(b'%', b'+', piece.as_bytes()).is_some() {
            form_urlencoded::parse(piece.as_bytes()).for_each(|(k, v)| each(k, v));
        } else {
            plain_pairs(piece, &mut each);
        }
        start = end + 1;
    }
}

/// The pairs of `text`, which has no `%` and no `+`: split at each `&`, and each piece at its
/// first `=` (a piece without one is a name with an empty value); empty pieces are skipped.
/// The delimiters are found eight bytes at a time (`for_each_delimiter`): pairs are short, and a
/// `memchr` search per delimiter costs more in setting up than in searching.
fn plain_pairs<'a>(text: &'a str, mut each: impl FnMut(Cow<'a, str>, Cow<'a, str>)) {
    let bytes = text.as_bytes();
    let (mut start, mut eq) = (0, None);
    let mut at_delimiter = |at: usize| {
        if at < bytes.len() && bytes[at] == b'=' {
            eq.get_or_insert(at);
            return;
        }
        if at > start {
            match eq {
                Some(e) => each(
                    Cow::Borrowed(&text[start..e]),
                    Cow::Borrowed(&text[e + 1..at]),
                ),
                None => each(Cow::Borrowed(&text[start..at]), Cow::Borrowed("")),
            }
        }
        (start, eq) = (at + 1, None);
    };
    let mut words = bytes.chunks_exact(8);
    let mut base = 0;
    for word in words.by_ref() {
        let word = u64::from_le_bytes(word.try_into().expect("eight bytes"));
        for_each_delimiter(word, |i| at_delimiter(base + i));
        base += 8;
    }
    let mut last = [0u8; 8];
    last[..words.remainder().len()].copy_from_slice(words.remainder());
    for_each_delimiter(u64::from_le_bytes(last), |i| at_delimiter(base + i));
    at_delimiter(bytes.len());
}

/// Calls `f` with the index of every `&` and `=` in the eight bytes of `word` (little-endian),
/// in order.
fn for_each_delimiter(word: u64, mut f: impl FnMut(usize)) {
    use crate::swar::{splat, zero_bytes};
    let mut found = zero_bytes(word ^ splat(b'&')) | zero_bytes(word ^ splat(b'='));
    while found != 0 {
        f(found.trailing_zeros() as usize / 8);
        found &= found - 1;
    }
}

/// The parameter names any method reads. Other names are ignored (`Sign`, `v`, `OSInfo`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Param {
    Token,
    ProductId,
    Key,
    MachineCode,
    FriendlyName,
    FloatingTimeInterval,
    MaxOverdraft,
    FieldsToReturn,
    SignMethod,
    Metadata,
    ModelVersion,
    Floating,
    States,
    Limit,
    OrderBy,
    StartingAfter,
    EndingBefore,
}

impl Param {
    pub const ALL: [Param; 17] = [
        Param::Token,
        Param::ProductId,
        Param::Key,
        Param::MachineCode,
        Param::FriendlyName,
        Param::FloatingTimeInterval,
        Param::MaxOverdraft,
        Param::FieldsToReturn,
        Param::SignMethod,
        Param::Metadata,
        Param::ModelVersion,
        Param::Floating,
        Param::States,
        Param::Limit,
        Param::OrderBy,
        Param::StartingAfter,
        Param::EndingBefore,
    ];

    /// The name as Cryptolens documents it (matched case-insensitively).
    pub const fn name(self) -> &'static str {
        match self {
            Param::Token => "token",
            Param::ProductId => "ProductId",
            Param::Key => "Key",
            Param::MachineCode => "MachineCode",
            Param::FriendlyName => "FriendlyName",
            Param::FloatingTimeInterval => "FloatingTimeInterval",
            Param::MaxOverdraft => "MaxOverdraft",
            Param::FieldsToReturn => "FieldsToReturn",
            Param::SignMethod => "SignMethod",
            Param::Metadata => "Metadata",
            Param::ModelVersion => "ModelVersion",
            Param::Floating => "Floating",
            Param::States => "States",
            Param::Limit => "Limit",
            Param::OrderBy => "OrderBy",
            Param::StartingAfter => "StartingAfter",
            Param::EndingBefore => "EndingBefore",
        }
    }

    /// `name()` in lowercase, for `of`.
    const fn lowercase(self) -> &'static str {
        match self {
            Param::Token => "token",
            Param::ProductId => "productid",
            Param::Key => "key",
            Param::MachineCode => "machinecode",
            Param::FriendlyName => "friendlyname",
            Param::FloatingTimeInterval => "floatingtimeinterval",
            Param::MaxOverdraft => "maxoverdraft",
            Param::FieldsToReturn => "fieldstoreturn",
            Param::SignMethod => "signmethod",
            Param::Metadata => "metadata",
            Param::ModelVersion => "modelversion",
            Param::Floating => "floating",
            Param::States => "states",
            Param::Limit => "limit",
            Param::OrderBy => "orderby",
            Param::StartingAfter => "startingafter",
            Param::EndingBefore => "endingbefore",
        }
    }

    /// The known parameter `name` names, in any casing. The length and the first letter (and
    /// for the two 12-letter `M` names the second) leave one candidate, so each name a client
    /// sends costs one comparison at most, instead of one per lookup per pair.
    fn of(name: &str) -> Option<Param> {
        let b = name.as_bytes();
        // `| 0x20` lowercases ASCII letters; what it does to other bytes only lets a candidate
        // through that the full comparison below then refuses.
        let first = *b.first()? | 0x20;
        let candidate = match (b.len(), first) {
            (3, b'k') => Param::Key,
            (5, b't') => Param::Token,
            (5, b'l') => Param::Limit,
            (6, b's') => Param::States,
            (7, b'o') => Param::OrderBy,
            (8, b'm') => Param::Metadata,
            (8, b'f') => Param::Floating,
            (9, b'p') => Param::ProductId,
            (10, b's') => Param::SignMethod,
            (11, b'm') => Param::MachineCode,
            (12, b'f') => Param::FriendlyName,
            (12, b'm') if b[1] | 0x20 == b'a' => Param::MaxOverdraft,
            (12, b'm') => Param::ModelVersion,
            (12, b'e') => Param::EndingBefore,
            (13, b's') => Param::StartingAfter,
            (14, b'f') => Param::FieldsToReturn,
            (20, b'f') => Param::FloatingTimeInterval,
            _ => return None,
        };
        // Every known name is ASCII letters only, and `b | 0x20` is a lowercase ASCII letter
        // only when `b` is that letter in either case: so this is `eq_ignore_ascii_case`, in
        // a form without early exits that the compiler vectorises (lengths already match).
        let lower = candidate.lowercase().as_bytes();
        let differ = b
            .iter()
            .zip(lower)
            .fold(0, |acc, (x, y)| acc | ((x | 0x20) ^ y));
        (differ == 0).then_some(candidate)
    }
}

/// The merged query-string and form-body parameters of one request, kept by name as they are
/// parsed (nothing else is kept). The first occurrence of a name wins, query before body, as
/// ASP.NET model binding does.
pub struct Params<'a> {
    values: [Option<Cow<'a, str>>; Param::ALL.len()],
}

impl<'a> Params<'a> {
    pub fn parse(query: &'a [u8], body: &'a [u8]) -> Params<'a> {
        let mut values = [const { None }; Param::ALL.len()];
        let mut keep = |k: Cow<'a, str>, v: Cow<'a, str>| {
            if let Some(p) = Param::of(&k) {
                values[p as usize].get_or_insert(v);
            }
        };
        parse_into(query, &mut keep);
        parse_into(body, &mut keep);
        Params { values }
    }

    pub fn raw(&self, p: Param) -> Option<&str> {
        self.values[p as usize].as_deref()
    }

    /// A value where empty means "not given" (.NET sends `Name=` for every unset property).
    fn present(&self, name: Param) -> Option<&str> {
        self.raw(name).map(trim).filter(|v| !v.is_empty())
    }

    pub fn string(&self, name: Param) -> Result<String, DecodeError> {
        bounded(name.name(), self.raw(name).unwrap_or_default())
    }

    pub fn required_string(&self, name: Param) -> Result<String, DecodeError> {
        match self.raw(name) {
            Some(v) if !v.is_empty() => bounded(name.name(), v),
            _ => Err(DecodeError::BadParameter(name.name())),
        }
    }

    pub fn int(&self, name: Param, default: i64) -> Result<i64, DecodeError> {
        match self.present(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| DecodeError::BadParameter(name.name())),
        }
    }

    pub fn required_int(&self, name: Param) -> Result<i64, DecodeError> {
        match self.present(name) {
            None => Err(DecodeError::BadParameter(name.name())),
            Some(v) => v
                .parse()
                .map_err(|_| DecodeError::BadParameter(name.name())),
        }
    }

    pub fn bool(&self, name: Param, default: bool) -> Result<bool, DecodeError> {
        match self.present(name) {
            None => Ok(default),
            Some(v) if v.eq_ignore_ascii_case("true") || v == "1" => Ok(true),
            Some(v) if v.eq_ignore_ascii_case("false") || v == "0" => Ok(false),
            Some(_) => Err(DecodeError::BadParameter(name.name())),
        }
    }

    pub fn token(&self) -> Result<String, DecodeError> {
        match self.present(Param::Token) {
            Some(t) if t.len() <= MAX_FIELD_LEN => Ok(t.to_owned()),
            Some(_) => Err(DecodeError::BadParameter("token")),
            None => Err(DecodeError::MissingToken),
        }
    }

    /// `SignMethod`: a number, or .NET's enum names.
    pub fn sign_method(&self) -> Result<SignMethod, DecodeError> {
        match self.present(Param::SignMethod) {
            None => Ok(SignMethod::Linq),
            Some(v) if v.eq_ignore_ascii_case("StringSign") || v == "1" => Ok(SignMethod::String),
            Some(v) if v.eq_ignore_ascii_case("LinqSign") || v == "0" => Ok(SignMethod::Linq),
            Some(_) => Err(DecodeError::BadParameter("SignMethod")),
        }
    }
}

/// `str::trim`, without its scan for Unicode whitespace when both ends are visible ASCII
/// (which `trim` would keep), as they are in what the SDKs send.
fn trim(v: &str) -> &str {
    match (v.as_bytes().first(), v.as_bytes().last()) {
        (Some(a), Some(z)) if a.is_ascii_graphic() && z.is_ascii_graphic() => v,
        _ => v.trim(),
    }
}

/// `v` as an owned string, if it is not longer than `MAX_FIELD_LEN`.
fn bounded(name: &'static str, v: &str) -> Result<String, DecodeError> {
    if v.len() > MAX_FIELD_LEN {
        return Err(DecodeError::BadParameter(name));
    }
    Ok(v.to_owned())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignMethod {
    /// 0: the .NET-only object form. Answered in the `StringSign` form (documented difference).
    Linq,
    /// 1: base64 JSON plus a detached signature.
    String,
}

/// Activate and GetKey share their response options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseOptions {
    pub fields_to_return: i64,
    pub sign_method: SignMethod,
    pub metadata: bool,
    pub model_version: i64,
}

impl ResponseOptions {
    fn decode(p: &Params<'_>) -> Result<ResponseOptions, DecodeError> {
        Ok(ResponseOptions {
            fields_to_return: p.int(Param::FieldsToReturn, 0)?,
            sign_method: p.sign_method()?,
            metadata: p.bool(Param::Metadata, false)?,
            model_version: p.int(Param::ModelVersion, 1)?,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActivateRequest {
    pub token: String,
    pub product_id: i64,
    pub key: String,
    pub machine_code: String,
    pub friendly_name: String,
    pub floating_interval: i64,
    pub max_overdraft: i64,
    pub options: ResponseOptions,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GetKeyRequest {
    pub token: String,
    pub product_id: i64,
    pub key: String,
    /// Only used for `metadata.usedFloatingMachines`.
    pub floating_interval: i64,
    pub options: ResponseOptions,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeactivateRequest {
    pub token: String,
    pub product_id: i64,
    pub key: String,
    pub machine_code: String,
    pub floating: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateTrialKeyRequest {
    pub token: String,
    pub product_id: i64,
    pub machine_code: String,
    pub friendly_name: String,
}

/// Largest `Limit` of GetWebAPILog (Cryptolens' documented maximum).
pub const MAX_LOG_LIMIT: i64 = 1000;

/// GetWebAPILog. Zero and empty values mean "not given", as the Python SDK sends them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebApiLogRequest {
    pub token: String,
    pub product_id: Option<i64>,
    pub key: Option<String>,
    /// `MachineCode`, `FriendlyName`, `States` (a JSON array of state codes), `Limit`,
    /// `StartingAfter`, `EndingBefore`, and `OrderBy` (ascending or not).
    pub filter: LogFilter,
}

impl WebApiLogRequest {
    fn decode(p: &Params<'_>, token: String) -> Result<WebApiLogRequest, DecodeError> {
        let positive = |name: Param| -> Result<Option<i64>, DecodeError> {
            match p.int(name, 0)? {
                0 => Ok(None),
                v if v > 0 => Ok(Some(v)),
                _ => Err(DecodeError::BadParameter(name.name())),
            }
        };
        let text = |name: Param| -> Result<Option<String>, DecodeError> {
            Ok(Some(p.string(name)?).filter(|v| !v.is_empty()))
        };
        let states = match p.present(Param::States) {
            None => Vec::new(),
            Some(v) => parse_states(v).ok_or(DecodeError::BadParameter("States"))?,
        };
        let limit = p.int(Param::Limit, 10)?;
        if !(1..=MAX_LOG_LIMIT).contains(&limit) {
            return Err(DecodeError::BadParameter("Limit"));
        }
        // Deprecated, but sent: "Id descending", "Time ascending", ...
        let ascending = match p.present(Param::OrderBy) {
            None => false,
            Some(v) => {
                let v = v.to_ascii_lowercase();
                let mut words = v.split_whitespace();
                match (words.next(), words.next(), words.next()) {
                    (Some("id" | "time"), None | Some("descending" | "desc"), None) => false,
                    (Some("id" | "time"), Some("ascending" | "asc"), None) => true,
                    _ => return Err(DecodeError::BadParameter("OrderBy")),
                }
            }
        };
        let r = WebApiLogRequest {
            token,
            product_id: positive(Param::ProductId)?,
            key: text(Param::Key)?,
            filter: LogFilter {
                machine_code: text(Param::MachineCode)?,
                friendly_name: text(Param::FriendlyName)?,
                states,
                limit,
                starting_after: positive(Param::StartingAfter)?,
                ending_before: positive(Param::EndingBefore)?,
                ascending,
            },
        };
        if r.key.is_some() && r.product_id.is_none() {
            return Err(DecodeError::BadParameter("ProductId"));
        }
        if r.filter.starting_after.is_some() && r.filter.ending_before.is_some() {
            return Err(DecodeError::BadParameter("EndingBefore"));
        }
        Ok(r)
    }
}

/// `[3010, 2010]` (spaces allowed), at most 64 codes.
fn parse_states(v: &str) -> Option<Vec<u16>> {
    let inner = v.trim().strip_prefix('[')?.strip_suffix(']')?.trim();
    if inner.is_empty() {
        return Some(Vec::new());
    }
    let codes: Vec<u16> = inner
        .split(',')
        .map(|c| c.trim().parse().ok())
        .collect::<Option<_>>()?;
    (codes.len() <= 64).then_some(codes)
}

/// Any decoded client request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Activate(ActivateRequest),
    GetKey(GetKeyRequest),
    Deactivate(DeactivateRequest),
    CreateTrialKey(CreateTrialKeyRequest),
    GetWebApiLog(WebApiLogRequest),
}

impl Request {
    pub fn decode(route: Route, p: &Params<'_>) -> Result<Request, DecodeError> {
        let token = p.token()?;
        Ok(match route {
            Route::Activate => {
                let r = ActivateRequest {
                    token,
                    product_id: p.required_int(Param::ProductId)?,
                    key: p.required_string(Param::Key)?,
                    machine_code: p.string(Param::MachineCode)?,
                    friendly_name: p.string(Param::FriendlyName)?,
                    floating_interval: p.int(Param::FloatingTimeInterval, 0)?,
                    max_overdraft: p.int(Param::MaxOverdraft, 0)?,
                    options: ResponseOptions::decode(p)?,
                };
                if r.floating_interval < 0 {
                    return Err(DecodeError::BadParameter("FloatingTimeInterval"));
                }
                if r.max_overdraft < 0 {
                    return Err(DecodeError::BadParameter("MaxOverdraft"));
                }
                Request::Activate(r)
            }
            Route::GetKey => Request::GetKey(GetKeyRequest {
                token,
                product_id: p.required_int(Param::ProductId)?,
                key: p.required_string(Param::Key)?,
                floating_interval: p.int(Param::FloatingTimeInterval, 0)?.max(0),
                options: ResponseOptions::decode(p)?,
            }),
            Route::Deactivate => Request::Deactivate(DeactivateRequest {
                token,
                product_id: p.required_int(Param::ProductId)?,
                key: p.required_string(Param::Key)?,
                machine_code: p.string(Param::MachineCode)?,
                floating: p.bool(Param::Floating, false)?,
            }),
            Route::CreateTrialKey => Request::CreateTrialKey(CreateTrialKeyRequest {
                token,
                product_id: p.required_int(Param::ProductId)?,
                machine_code: p.string(Param::MachineCode)?,
                friendly_name: p.string(Param::FriendlyName)?,
            }),
            Route::GetWebApiLog => Request::GetWebApiLog(WebApiLogRequest::decode(p, token)?),
        })
    }

    pub fn token(&self) -> &str {
        match self {
            Request::Activate(r) => &r.token,
            Request::GetKey(r) => &r.token,
            Request::Deactivate(r) => &r.token,
            Request::CreateTrialKey(r) => &r.token,
            Request::GetWebApiLog(r) => &r.token,
        }
    }
}

/// Decodes a whole request from its path, query and body: the fuzzed entry point.
pub fn decode(path: &str, query: &[u8], body: &[u8]) -> Result<Request, DecodeOutcome> {
    let r = route(path).map_err(DecodeOutcome::Route)?;
    Request::decode(r, &Params::parse(query, body)).map_err(DecodeOutcome::Params)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeOutcome {
    Route(RouteError),
    Params(DecodeError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_tolerate_sdk_spellings() {
        for p in [
            "/api/key/Activate",
            "/api/key/activate",
            "/api/Key/Activate",
            "/api//key/activate/",
            "//api///key//ACTIVATE//",
        ] {
            assert_eq!(route(p), Ok(Route::Activate), "{p}");
        }
        assert_eq!(route("/api/key/getkey"), Ok(Route::GetKey));
        assert_eq!(route("/api/Key/CreateTrialKey"), Ok(Route::CreateTrialKey));
        assert_eq!(route("/api/key/Deactivate/"), Ok(Route::Deactivate));
        assert_eq!(route("/api/ai/GetWebAPILog"), Ok(Route::GetWebApiLog));
        assert_eq!(route("/api//ai/getwebapilog/"), Ok(Route::GetWebApiLog));
        assert_eq!(route("/api/key/GetWebAPILog"), Err(RouteError::Unknown));
        assert_eq!(route("/api/ai/Activate"), Err(RouteError::Unknown));
        assert_eq!(route("/Ext/Activate"), Err(RouteError::Legacy));
        assert_eq!(route("/api/key/activate/extra"), Err(RouteError::Unknown));
        assert_eq!(route("/api/key"), Err(RouteError::Unknown));
        assert_eq!(route("/"), Err(RouteError::Unknown));
        assert_eq!(route(""), Err(RouteError::Unknown));
    }

    #[test]
    fn python_activate_body_decodes() {
        let body = b"token=abc&ProductId=3&key=AAAAA-BBBBB&MachineCode=mc&FieldsToReturn=0&metadata=False&FloatingTimeInterval=0&MaxOverdraft=0&FriendlyName=None&ModelVersion=3&Sign=True&SignMethod=1";
        let Ok(Request::Activate(r)) = decode("/api//key/activate", b"", body) else {
            panic!("did not decode")
        };
        assert_eq!(r.product_id, 3);
        assert_eq!(r.key, "AAAAA-BBBBB");
        assert_eq!(r.friendly_name, "None");
        assert!(!r.options.metadata);
        assert_eq!(r.options.model_version, 3);
        assert_eq!(r.options.sign_method, SignMethod::String);
    }

    #[test]
    fn dotnet_values_decode() {
        let body = b"token=t&ProductId=3&Key=K&MachineCode=&FriendlyName=&OSInfo=&SignMethod=StringSign&Metadata=True&v=1&modelversion=3&FloatingTimeInterval=&MaxOverdraft=";
        let Ok(Request::Activate(r)) = decode("/api//key/activate/", b"", body) else {
            panic!("did not decode")
        };
        assert_eq!(r.options.sign_method, SignMethod::String);
        assert!(r.options.metadata);
        assert_eq!(r.floating_interval, 0);
        assert_eq!(r.options.model_version, 3);
    }

    #[test]
    fn query_and_body_merge_query_first() {
        let Ok(Request::GetKey(r)) = decode(
            "/api/key/GetKey",
            b"token=q&ProductId=1",
            b"token=b&Key=K&ProductId=2",
        ) else {
            panic!("did not decode")
        };
        assert_eq!(
            (r.token.as_str(), r.product_id, r.key.as_str()),
            ("q", 1, "K")
        );
    }

    #[test]
    fn bad_values_are_errors() {
        let cases: [(&[u8], DecodeOutcome); 6] = [
            (
                b"ProductId=1&Key=K",
                DecodeOutcome::Params(DecodeError::MissingToken),
            ),
            (
                b"token=t&Key=K",
                DecodeOutcome::Params(DecodeError::BadParameter("ProductId")),
            ),
            (
                b"token=t&ProductId=x&Key=K",
                DecodeOutcome::Params(DecodeError::BadParameter("ProductId")),
            ),
            (
                b"token=t&ProductId=1",
                DecodeOutcome::Params(DecodeError::BadParameter("Key")),
            ),
            (
                b"token=t&ProductId=1&Key=K&Sign=maybe&Metadata=yes",
                DecodeOutcome::Params(DecodeError::BadParameter("Metadata")),
            ),
            (
                b"token=t&ProductId=1&Key=K&FloatingTimeInterval=-5",
                DecodeOutcome::Params(DecodeError::BadParameter("FloatingTimeInterval")),
            ),
        ];
        for (body, want) in cases {
            assert_eq!(
                decode("/api/key/activate", b"", body).unwrap_err(),
                want,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn malformed_encodings_never_panic() {
        let junk: [&[u8]; 6] = [
            b"%",
            b"%zz=%",
            b"\xff\xfe=\xff",
            b"&&&==&=",
            b"token=%E2%82",
            b"token",
        ];
        for j in junk {
            let _ = decode("/api/key/activate", j, j);
        }
    }

    /// A small deterministic generator, so a failing input can be reproduced from its seed.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn pick<'a>(&mut self, xs: &[&'a [u8]]) -> &'a [u8] {
            xs[(self.next() % xs.len() as u64) as usize]
        }
    }

    /// The pieces real and hostile clients send, for pseudo-random requests.
    const PIECES: &[&[u8]] = &[
        b"token",
        b"Token",
        b"ProductId",
        b"productid",
        b"Key",
        b"MachineCode",
        b"FriendlyName",
        b"FloatingTimeInterval",
        b"MaxOverdraft",
        b"Metadata",
        b"ModelVersion",
        b"SignMethod",
        b"States",
        b"Limit",
        b"StartingAfter",
        b"EndingBefore",
        b"OrderBy",
        b"[2010,",
        b"]",
        b"FieldsToReturn",
        b"=",
        b"&",
        b"%",
        b"%2",
        b"%41",
        b"%E2%82%AC",
        b"%FF",
        b"+",
        b"1",
        b"-1",
        b"0",
        b"99999999999999999999",
        b"True",
        b"false",
        b"None",
        b"null",
        b"StringSign",
        b"\xff",
        b"\x00",
        b"\xe2\x82",
        b" ",
        b"\"",
        b";",
        b"\r\n",
        b"&&",
        b"\xe2\x82\xac",
        b"a=b",
    ];

    /// The plain-pair fast path yields exactly what the general decoder does, pair for pair.
    #[test]
    fn form_parsing_matches_form_urlencoded() {
        let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
        for _ in 0..20_000 {
            let mut input = Vec::new();
            for _ in 0..rng.next() % 16 {
                input.extend_from_slice(rng.pick(PIECES));
            }
            let mut ours = Vec::new();
            parse_into(&input, |k, v| ours.push((k, v)));
            let theirs: Vec<_> = form_urlencoded::parse(&input).collect();
            assert_eq!(ours, theirs, "{:?}", String::from_utf8_lossy(&input));
        }
    }

    #[test]
    fn trim_is_str_trim() {
        let pieces = [
            "", " ", "\t", "\u{a0}", "\u{2003}", "\u{3000}", "1", "True", "a b", "\u{e9}", "\r\n",
            "\u{85}", "\0", "~", "\u{7f}",
        ];
        for a in pieces {
            for b in pieces {
                for c in pieces {
                    let v = format!("{a}{b}{c}");
                    assert_eq!(trim(&v), v.trim(), "{v:?}");
                }
            }
        }
    }

    /// Every byte value at every position of a word: found exactly when it is `&` or `=`.
    #[test]
    fn delimiters_are_found_exactly_in_a_word() {
        for pos in 0..8 {
            for byte in 0..=255u8 {
                for fill in [0u8, b'a', 0xff, b'&' ^ 0x80, b'=' - 1, b'=' + 1] {
                    let mut word = [fill; 8];
                    word[pos] = byte;
                    let mut found = Vec::new();
                    for_each_delimiter(u64::from_le_bytes(word), |i| found.push(i));
                    let want: Vec<usize> = (0..8)
                        .filter(|&i| word[i] == b'&' || word[i] == b'=')
                        .collect();
                    assert_eq!(found, want, "{word:?}");
                }
            }
        }
    }

    /// Looking a name up in what `Params` kept gives what a case-insensitive scan of all the
    /// pairs (query, then body) finds first, for every known name.
    #[test]
    fn kept_parameters_match_a_scan_of_all_pairs() {
        let mut rng = XorShift(0x0DDB_1A5E_5BAD_5EED);
        for _ in 0..20_000 {
            let mut parts: [Vec<u8>; 2] = Default::default();
            for part in &mut parts {
                for _ in 0..rng.next() % 16 {
                    part.extend_from_slice(rng.pick(PIECES));
                }
            }
            let params = Params::parse(&parts[0], &parts[1]);
            let all: Vec<_> = form_urlencoded::parse(&parts[0])
                .chain(form_urlencoded::parse(&parts[1]))
                .collect();
            for p in Param::ALL {
                let scanned = all
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(p.name()))
                    .map(|(_, v)| v.as_ref());
                assert_eq!(
                    params.raw(p),
                    scanned,
                    "{p:?} in {:?} / {:?}",
                    String::from_utf8_lossy(&parts[0]),
                    String::from_utf8_lossy(&parts[1])
                );
            }
        }
    }

    #[test]
    fn parameter_names_are_known_in_any_casing_and_only_them() {
        for p in Param::ALL {
            let name = p.name();
            assert_eq!(p.lowercase(), name.to_ascii_lowercase());
            assert!(name.bytes().all(|b| b.is_ascii_alphabetic()), "{name}");
            for spelled in [
                name.to_owned(),
                name.to_ascii_lowercase(),
                name.to_ascii_uppercase(),
            ] {
                assert_eq!(Param::of(&spelled), Some(p), "{spelled}");
            }
            // One letter changed, or one added or dropped, is another name.
            let mut changed = name.to_owned().into_bytes();
            changed[name.len() - 1] ^= 0x01;
            assert_eq!(Param::of(std::str::from_utf8(&changed).unwrap()), None);
            assert_eq!(Param::of(&format!("{name}x")), None);
            assert_eq!(Param::of(&name[..name.len() - 1]), None);
        }
        for other in ["", "Sign", "v", "OSInfo", "Kez", "\u{ff}ey", "tokeN\0"] {
            assert_eq!(Param::of(other), None, "{other:?}");
        }
        // ASCII-only case folding: the Kelvin sign is not a `K`.
        assert_eq!(Param::of("\u{212A}ey"), None);
    }

    /// Pseudo-random requests built from the pieces real and hostile clients send: every one
    /// decodes or is refused, and what decodes respects the field limits.
    #[test]
    fn random_inputs_decode_or_refuse() {
        const PATHS: &[&[u8]] = &[
            b"/api/key/Activate",
            b"//api//key/getkey/",
            b"/api/key/Deactivate",
            b"/api/key/CreateTrialKey",
            b"/api/ai/GetWebAPILog",
            b"/Ext/Activate",
            b"/api/key/",
            b"/api/key/activate/x",
            b"%2F",
            b"",
            b"/api/\xff/activate",
        ];
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let mut decoded = 0;
        for _ in 0..20_000 {
            let path = String::from_utf8_lossy(rng.pick(PATHS)).into_owned();
            let mut parts: [Vec<u8>; 2] = Default::default();
            if rng.next().is_multiple_of(3) {
                // A valid base, so that the junk after it is what gets tested.
                parts[rng.next() as usize % 2]
                    .extend_from_slice(b"token=t&ProductId=1&Key=K&MachineCode=m&");
            }
            for part in &mut parts {
                for _ in 0..rng.next() % 24 {
                    part.extend_from_slice(rng.pick(PIECES));
                }
                if rng.next().is_multiple_of(50) {
                    part.extend(std::iter::repeat_n(b'a', MAX_FIELD_LEN + 1));
                }
            }
            if let Ok(req) = decode(&path, &parts[0], &parts[1]) {
                decoded += 1;
                let (token, key) = match &req {
                    Request::Activate(r) => (&r.token, r.key.as_str()),
                    Request::GetKey(r) => (&r.token, r.key.as_str()),
                    Request::Deactivate(r) => (&r.token, r.key.as_str()),
                    Request::CreateTrialKey(r) => (&r.token, ""),
                    Request::GetWebApiLog(r) => (&r.token, r.key.as_deref().unwrap_or("")),
                };
                assert!(token.len() <= MAX_FIELD_LEN && key.len() <= MAX_FIELD_LEN);
            }
        }
        // The alphabet is rich enough that some inputs get through, so both branches ran.
        assert!(decoded > 0, "no random input decoded");
    }

    #[test]
    fn web_api_log_takes_python_sdk_defaults_and_refuses_bad_filters() {
        let dec = |body: &str| decode("/api/ai/getwebapilog", b"", body.as_bytes());
        // What licensing 0.54's AI.get_web_api_log sends with its defaults.
        let r = dec("token=t&ProductId=0&Key=&MachineCode=&FriendlyName=&Limit=10&StartingAfter=0&OrderBy=&EndingBefore=0").unwrap();
        let Request::GetWebApiLog(r) = r else {
            panic!("{r:?}")
        };
        assert_eq!(
            (
                r.product_id,
                r.key,
                r.filter.machine_code,
                r.filter.limit,
                r.filter.starting_after,
                r.filter.ascending
            ),
            (None, None, None, 10, None, false)
        );
        let Request::GetWebApiLog(r) = dec("token=t&ProductId=3&Key=K&States=%5B2010%2C%202011%5D&OrderBy=Time%20ascending&StartingAfter=9").unwrap() else { panic!() };
        assert_eq!(
            (
                r.product_id,
                r.key.as_deref(),
                r.filter.states,
                r.filter.ascending,
                r.filter.starting_after
            ),
            (Some(3), Some("K"), vec![2010, 2011], true, Some(9))
        );
        for bad in [
            "token=t&Limit=0",
            "token=t&Limit=1001",
            "token=t&Key=K",
            "token=t&States=2010",
            "token=t&States=%5B70000%5D",
            "token=t&OrderBy=Key",
            "token=t&StartingAfter=-1",
            "token=t&StartingAfter=2&EndingBefore=5",
        ] {
            assert!(matches!(dec(bad), Err(DecodeOutcome::Params(_))), "{bad}");
        }
    }
}
