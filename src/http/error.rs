//! Every failure a client can see, mapped in one place to an HTTP status and the exact
//! Cryptolens message. Bodies are always `{"result":1,"message":...}`.

use crate::domain::{Reject, StateCode};
use crate::request::{DecodeError, DecodeOutcome, RouteError};
use http::StatusCode;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiError {
    Unauthenticated,
    AccessDenied,
    BadInput,
    ProductNotFound,
    KeyNotFound,
    Blocked,
    LimitReached,
    NotActivated,
    TrialAlreadyUsed,
    TrialMachineNull,
    TrialMachineTooLong,
    Internal,
    // Transport-level problems Cryptolens has no message for; worded in its style.
    BodyTooLarge,
    BodyTimeout,
    UnsupportedEncoding,
    UnknownMethod,
    LegacyApi,
    HttpMethod,
    RateLimited,
    /// Distributed mode with Redis unreachable: a change (new activation, deactivation)
    /// cannot be committed where every node sees it.
    Unavailable,
}

impl ApiError {
    pub fn message(self) -> &'static str {
        match self {
            ApiError::Unauthenticated => "Unable to authenticate.",
            ApiError::AccessDenied => "Access denied.",
            ApiError::BadInput => "The input parameters were incorrect.",
            ApiError::ProductNotFound => "Could not find the product.",
            ApiError::KeyNotFound => "Could not find the key.",
            ApiError::Blocked => "The key is blocked and cannot be accessed.",
            ApiError::LimitReached => "Cannot activate the new device as the limit has been reached.",
            ApiError::NotActivated => {
                "Either the machine code was never activated or key activation feature was never set up."
            }
            ApiError::TrialAlreadyUsed => "This machine code has already activated the trial.",
            ApiError::TrialMachineNull => "The machine code cannot be null.",
            ApiError::TrialMachineTooLong => "The machine code cannot exceed 128 chars in length.",
            ApiError::Internal => {
                "Something went wrong. Please contact support@cryptolens.io and we will try to fix it."
            }
            ApiError::BodyTooLarge => "The request body is too large.",
            ApiError::BodyTimeout => "The request body was not received in time.",
            ApiError::UnsupportedEncoding => "The request body must be application/x-www-form-urlencoded without content encoding.",
            ApiError::UnknownMethod => "The requested method does not exist.",
            ApiError::LegacyApi => "Web API 2 is not supported. Please use Web API 3 (/api/key/Activate).",
            ApiError::HttpMethod => "Only GET and POST are supported.",
            ApiError::RateLimited => "Too many requests. Please try again later.",
            ApiError::Unavailable => {
                "The license server cannot record activations right now. Please try again later."
            }
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ApiError::Unauthenticated => StatusCode::UNAUTHORIZED,
            ApiError::AccessDenied => StatusCode::FORBIDDEN,
            ApiError::UnknownMethod | ApiError::LegacyApi => StatusCode::NOT_FOUND,
            ApiError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::UnsupportedEncoding => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::HttpMethod => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// Low-cardinality metric label.
    pub fn label(self) -> &'static str {
        match self {
            ApiError::Unauthenticated => "unauthenticated",
            ApiError::AccessDenied => "access_denied",
            ApiError::BadInput => "bad_input",
            ApiError::ProductNotFound => "product_not_found",
            ApiError::KeyNotFound => "key_not_found",
            ApiError::Blocked => "blocked",
            ApiError::LimitReached => "limit_reached",
            ApiError::NotActivated => "not_activated",
            ApiError::TrialAlreadyUsed
            | ApiError::TrialMachineNull
            | ApiError::TrialMachineTooLong => "trial_refused",
            ApiError::Internal => "internal",
            ApiError::BodyTooLarge
            | ApiError::BodyTimeout
            | ApiError::UnsupportedEncoding
            | ApiError::UnknownMethod
            | ApiError::LegacyApi
            | ApiError::HttpMethod => "bad_request",
            ApiError::RateLimited => "rate_limited",
            ApiError::Unavailable => "unavailable",
        }
    }
}

impl From<Reject> for ApiError {
    fn from(r: Reject) -> ApiError {
        match r {
            Reject::Blocked => ApiError::Blocked,
            Reject::Limit | Reject::FloatingLimit => ApiError::LimitReached,
        }
    }
}

impl From<DecodeOutcome> for ApiError {
    fn from(d: DecodeOutcome) -> ApiError {
        match d {
            DecodeOutcome::Route(RouteError::Legacy) => ApiError::LegacyApi,
            DecodeOutcome::Route(RouteError::Unknown) => ApiError::UnknownMethod,
            DecodeOutcome::Params(DecodeError::MissingToken) => ApiError::Unauthenticated,
            DecodeOutcome::Params(DecodeError::BadParameter(_)) => ApiError::BadInput,
        }
    }
}

/// A failed call with the log state code it is recorded under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failure {
    pub error: ApiError,
    pub code: StateCode,
}

impl Failure {
    pub fn new(error: ApiError, code: StateCode) -> Failure {
        Failure { error, code }
    }
}
