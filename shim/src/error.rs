//! The shim's error type and its single mapping onto ttrpc status codes.

use containerd_shim::protos::ttrpc::{self, Code, Status};

/// Result of the shim's own operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong inside the shim. Each variant carries what was being done and to
/// what, so the message that reaches `ctr`/the kubelet is enough to act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A container or exec id the shim does not know.
    #[error("{0}")]
    NotFound(String),
    /// An id that is already in use.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request itself is malformed (bad options, bad spec).
    #[error("{0}")]
    InvalidArgument(String),
    /// The request is valid but the task is in the wrong state for it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The shim does not offer this operation.
    #[error("{0}")]
    Unimplemented(String),
    /// runc (or CRIU through runc) failed; `message` is runc's own last error.
    #[error("runc {op} failed for container {id}: {message}")]
    Runc {
        /// The runc sub-command, e.g. `create`.
        op: String,
        /// The container id.
        id: String,
        /// runc's error, from its log.json, or its stderr.
        message: String,
    },
    /// A system call or file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, and to which path.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Anything else, already phrased for the user.
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// Wraps an `io::Error` with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    /// The ttrpc code containerd expects for this error.
    pub fn code(&self) -> Code {
        match self {
            Error::NotFound(_) => Code::NOT_FOUND,
            Error::AlreadyExists(_) => Code::ALREADY_EXISTS,
            Error::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            Error::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            Error::Unimplemented(_) => Code::UNIMPLEMENTED,
            Error::Runc { .. } | Error::Io { .. } | Error::Other(_) => Code::UNKNOWN,
        }
    }
}

impl From<nix::Error> for Error {
    fn from(e: nix::Error) -> Self {
        Error::Io {
            context: "system call".into(),
            source: std::io::Error::from(e),
        }
    }
}

impl From<containerd_shim::Error> for Error {
    fn from(e: containerd_shim::Error) -> Self {
        match e {
            containerd_shim::Error::NotFoundError(m) => Error::NotFound(m),
            containerd_shim::Error::FailedPreconditionError(m) => Error::FailedPrecondition(m),
            containerd_shim::Error::InvalidArgument(m) => Error::InvalidArgument(m),
            other => Error::Other(other.to_string()),
        }
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> Self {
        ttrpc::Error::RpcStatus(Status {
            code: e.code().into(),
            message: e.to_string(),
            ..Default::default()
        })
    }
}

impl From<Error> for containerd_shim::Error {
    fn from(e: Error) -> Self {
        containerd_shim::Error::Other(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_each_kind_to_the_code_containerd_expects() {
        let cases = [
            (Error::NotFound("x".into()), Code::NOT_FOUND),
            (Error::AlreadyExists("x".into()), Code::ALREADY_EXISTS),
            (Error::InvalidArgument("x".into()), Code::INVALID_ARGUMENT),
            (
                Error::FailedPrecondition("x".into()),
                Code::FAILED_PRECONDITION,
            ),
            (Error::Unimplemented("x".into()), Code::UNIMPLEMENTED),
            (Error::Other("x".into()), Code::UNKNOWN),
        ];
        for (err, code) in cases {
            match ttrpc::Error::from(err) {
                ttrpc::Error::RpcStatus(s) => assert_eq!(s.code(), code),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn runc_errors_name_the_operation_and_container() {
        let e = Error::Runc {
            op: "create".into(),
            id: "c1".into(),
            message: "exec: \"/nope\": no such file or directory".into(),
        };
        assert_eq!(
            e.to_string(),
            "runc create failed for container c1: exec: \"/nope\": no such file or directory"
        );
    }
}
