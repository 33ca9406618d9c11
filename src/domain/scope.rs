//! Access-token scopes: which methods, which product, which key, and the feature lock.

/// Client-facing Web API methods. The discriminant is the bit in a token's method set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    Activate = 1,
    GetKey = 2,
    Deactivate = 4,
    CreateTrialKey = 8,
    /// Reads the tenant's request log (machine codes, client networks): never give it to a
    /// token that ships inside an application.
    GetWebApiLog = 16,
}

impl Method {
    pub const ALL: [Method; 5] = [
        Method::Activate,
        Method::GetKey,
        Method::Deactivate,
        Method::CreateTrialKey,
        Method::GetWebApiLog,
    ];

    /// What a token gets when no methods are named: the four client methods. The log has to
    /// be asked for by name.
    pub const CLIENT: [Method; 4] = [
        Method::Activate,
        Method::GetKey,
        Method::Deactivate,
        Method::CreateTrialKey,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::Activate => "Activate",
            Method::GetKey => "GetKey",
            Method::Deactivate => "Deactivate",
            Method::CreateTrialKey => "CreateTrialKey",
            Method::GetWebApiLog => "GetWebAPILog",
        }
    }

    /// Case-insensitive, as the Cryptolens dashboard names them.
    pub fn parse(s: &str) -> Option<Method> {
        Method::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(s.trim()))
    }

    /// The client methods as a bitmask: the default set of a new token.
    pub fn client_bits() -> i64 {
        Method::CLIENT.iter().fold(0, |a, m| a | *m as i64)
    }
}

/// What a token may do. Built from its stored row; checked before any license is touched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    /// The token's row id: what per-token rate limits count by.
    pub token_id: i64,
    pub tenant_id: i64,
    pub methods: i64,
    /// `None`: any product of the tenant.
    pub product_lock: Option<i64>,
    /// `None`: any key; `Some(-1)`: any key, but the caller must name it (client-side tokens);
    /// `Some(id)`: only the key with that per-product `ID`.
    pub key_lock: Option<i64>,
    /// Field mask for Activate/GetKey, trial length for CreateTrialKey; 0 = not set.
    pub feature_lock: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScopeError {
    /// The method is not in the token's set, or the product lock does not match.
    AccessDenied,
}

impl Scope {
    pub fn allows_method(&self, m: Method) -> Result<(), ScopeError> {
        if self.methods & m as i64 != 0 {
            Ok(())
        } else {
            Err(ScopeError::AccessDenied)
        }
    }

    pub fn allows_product(&self, product_id: i64) -> Result<(), ScopeError> {
        match self.product_lock {
            Some(p) if p != product_id => Err(ScopeError::AccessDenied),
            _ => Ok(()),
        }
    }

    /// `key_id` is the per-product `ID` of the key the request names.
    pub fn allows_key(&self, key_id: i64) -> Result<(), ScopeError> {
        match self.key_lock {
            Some(k) if k != -1 && k != key_id => Err(ScopeError::AccessDenied),
            _ => Ok(()),
        }
    }

    /// The field mask to apply: the token's feature lock wins over `FieldsToReturn`.
    pub fn mask(&self, fields_to_return: i64) -> super::Mask {
        super::Mask(if self.feature_lock != 0 {
            self.feature_lock
        } else {
            fields_to_return
        })
    }
}
