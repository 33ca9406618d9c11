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
    let mut segs = path.split('/').filter(|s| !s.is_empty());
    let first = segs.next().unwrap_or("");
    if first.eq_ignore_ascii_case("ext") {
        return Err(RouteError::Legacy);
    }
    if !first.eq_ignore_ascii_case("api") {
        return Err(RouteError::Unknown);
    }
    let (Some(group), Some(method), None) = (segs.next(), segs.next(), segs.next()) else {
        return Err(RouteError::Unknown);
    };
    const METHODS: [(&str, &str, Route); 5] = [
        ("key", "activate", Route::Activate),
        ("key", "getkey", Route::GetKey),
        ("key", "deactivate", Route::Deactivate),
        ("key", "createtrialkey", Route::CreateTrialKey),
        ("ai", "getwebapilog", Route::GetWebApiLog),
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

/// `application/x-www-form-urlencoded` pairs, exactly as `form_urlencoded::parse` yields them.
/// What the SDKs send is mostly plain (valid UTF-8, no `%`, no `+`): such a name or value is
/// borrowed as it is, and only the others go through the general decoder. The input is
/// checked for UTF-8 once, not per name and value: the delimiters are ASCII, so every piece of
/// valid UTF-8 split at them is valid too. Delimiters are found with `memchr` (vectorised),
/// about three times fewer instructions than a loop that looks at every byte.
fn parse_into<'a>(input: &'a [u8], pairs: &mut Vec<(Cow<'a, str>, Cow<'a, str>)>) {
    let Ok(text) = std::str::from_utf8(input) else {
        // Not UTF-8 (hostile or broken input): the general decoder for all of it.
        pairs.extend(form_urlencoded::parse(input));
        return;
    };
    let bytes = text.as_bytes();
    let mut start = 0;
    while start < bytes.len() {
        let end = memchr::memchr(b'&', &bytes[start..]).map_or(bytes.len(), |i| start + i);
        let piece = &bytes[start..end];
        if memchr::memchr2(b'%', b'+', piece).is_some() {
            pairs.extend(form_urlencoded::parse(piece));
        } else if !piece.is_empty() {
            pairs.push(match memchr::memchr(b'=', piece) {
                Some(e) => (
                    Cow::Borrowed(&text[start..start + e]),
                    Cow::Borrowed(&text[start + e + 1..end]),
                ),
                None => (Cow::Borrowed(&text[start..end]), Cow::Borrowed("")),
            });
        }
        start = end + 1;
    }
}

/// The merged query-string and form-body parameters of one request. The first occurrence of a
/// name wins, query before body, as ASP.NET model binding does.
pub struct Params<'a> {
    pairs: Vec<(Cow<'a, str>, Cow<'a, str>)>,
}

impl<'a> Params<'a> {
    pub fn parse(query: &'a [u8], body: &'a [u8]) -> Params<'a> {
        let mut pairs: Vec<_> = Vec::with_capacity(16);
        parse_into(query, &mut pairs);
        parse_into(body, &mut pairs);
        Params { pairs }
    }

    pub fn raw(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_ref())
    }

    /// A value where empty means "not given" (.NET sends `Name=` for every unset property).
    fn present(&self, name: &str) -> Option<&str> {
        self.raw(name).map(str::trim).filter(|v| !v.is_empty())
    }

    pub fn string(&self, name: &'static str) -> Result<String, DecodeError> {
        bounded(name, self.raw(name).unwrap_or_default())
    }

    pub fn required_string(&self, name: &'static str) -> Result<String, DecodeError> {
        match self.raw(name) {
            Some(v) if !v.is_empty() => bounded(name, v),
            _ => Err(DecodeError::BadParameter(name)),
        }
    }

    pub fn int(&self, name: &'static str, default: i64) -> Result<i64, DecodeError> {
        match self.present(name) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| DecodeError::BadParameter(name)),
        }
    }

    pub fn required_int(&self, name: &'static str) -> Result<i64, DecodeError> {
        match self.present(name) {
            None => Err(DecodeError::BadParameter(name)),
            Some(v) => v.parse().map_err(|_| DecodeError::BadParameter(name)),
        }
    }

    pub fn bool(&self, name: &'static str, default: bool) -> Result<bool, DecodeError> {
        match self.present(name) {
            None => Ok(default),
            Some(v) if v.eq_ignore_ascii_case("true") || v == "1" => Ok(true),
            Some(v) if v.eq_ignore_ascii_case("false") || v == "0" => Ok(false),
            Some(_) => Err(DecodeError::BadParameter(name)),
        }
    }

    pub fn token(&self) -> Result<String, DecodeError> {
        match self.present("token") {
            Some(t) if t.len() <= MAX_FIELD_LEN => Ok(t.to_owned()),
            Some(_) => Err(DecodeError::BadParameter("token")),
            None => Err(DecodeError::MissingToken),
        }
    }

    /// `SignMethod`: a number, or .NET's enum names.
    pub fn sign_method(&self) -> Result<SignMethod, DecodeError> {
        match self.present("SignMethod") {
            None => Ok(SignMethod::Linq),
            Some(v) if v.eq_ignore_ascii_case("StringSign") || v == "1" => Ok(SignMethod::String),
            Some(v) if v.eq_ignore_ascii_case("LinqSign") || v == "0" => Ok(SignMethod::Linq),
            Some(_) => Err(DecodeError::BadParameter("SignMethod")),
        }
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
            fields_to_return: p.int("FieldsToReturn", 0)?,
            sign_method: p.sign_method()?,
            metadata: p.bool("Metadata", false)?,
            model_version: p.int("ModelVersion", 1)?,
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
        let positive = |name: &'static str| -> Result<Option<i64>, DecodeError> {
            match p.int(name, 0)? {
                0 => Ok(None),
                v if v > 0 => Ok(Some(v)),
                _ => Err(DecodeError::BadParameter(name)),
            }
        };
        let text = |name: &'static str| -> Result<Option<String>, DecodeError> {
            Ok(Some(p.string(name)?).filter(|v| !v.is_empty()))
        };
        let states = match p.present("States") {
            None => Vec::new(),
            Some(v) => parse_states(v).ok_or(DecodeError::BadParameter("States"))?,
        };
        let limit = p.int("Limit", 10)?;
        if !(1..=MAX_LOG_LIMIT).contains(&limit) {
            return Err(DecodeError::BadParameter("Limit"));
        }
        // Deprecated, but sent: "Id descending", "Time ascending", ...
        let ascending = match p.present("OrderBy") {
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
            product_id: positive("ProductId")?,
            key: text("Key")?,
            filter: LogFilter {
                machine_code: text("MachineCode")?,
                friendly_name: text("FriendlyName")?,
                states,
                limit,
                starting_after: positive("StartingAfter")?,
                ending_before: positive("EndingBefore")?,
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
                    product_id: p.required_int("ProductId")?,
                    key: p.required_string("Key")?,
                    machine_code: p.string("MachineCode")?,
                    friendly_name: p.string("FriendlyName")?,
                    floating_interval: p.int("FloatingTimeInterval", 0)?,
                    max_overdraft: p.int("MaxOverdraft", 0)?,
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
                product_id: p.required_int("ProductId")?,
                key: p.required_string("Key")?,
                floating_interval: p.int("FloatingTimeInterval", 0)?.max(0),
                options: ResponseOptions::decode(p)?,
            }),
            Route::Deactivate => Request::Deactivate(DeactivateRequest {
                token,
                product_id: p.required_int("ProductId")?,
                key: p.required_string("Key")?,
                machine_code: p.string("MachineCode")?,
                floating: p.bool("Floating", false)?,
            }),
            Route::CreateTrialKey => Request::CreateTrialKey(CreateTrialKeyRequest {
                token,
                product_id: p.required_int("ProductId")?,
                machine_code: p.string("MachineCode")?,
                friendly_name: p.string("FriendlyName")?,
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
            parse_into(&input, &mut ours);
            let theirs: Vec<_> = form_urlencoded::parse(&input).collect();
            assert_eq!(ours, theirs, "{:?}", String::from_utf8_lossy(&input));
        }
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
