//! One connection's access control, the same for the bank and the queue: without a users
//! file every request is served (protected mode keeps such a service on this machine); with
//! one, a connection may do what its user's rights allow once it has authenticated (AUTH,
//! or its Unix peer's uid). The rules are `users.rs`'; this is the connection's side of them:
//! answering AUTH under the worker's throttle, checking each request, counting and logging.

use std::cell::RefCell;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use forkpool_common::bank::{AuthToken, UserName};

use crate::scoreboard::ServiceCounters;
use crate::users::{AuthOutcome, AuthThrottle, ConnAuth, Denied, Guarded, PeerKey, User, Users};

/// A connection's access control.
#[derive(Debug)]
pub struct Access {
    users: Option<&'static Users>,
    /// The worker's failed-AUTH limits per peer.
    throttle: &'static RefCell<AuthThrottle>,
    auth: ConnAuth,
    peer: PeerKey,
    /// Where AUTH outcomes and denials are counted.
    counters: &'static ServiceCounters,
}

/// What the access control made of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Screened {
    /// The service serves it.
    Serve,
    /// An AUTH (with users configured) succeeded: `OK <user>`.
    Authenticated(UserName),
    /// `ERR denied <why>`; `close`: then close the connection (too many failed AUTHs).
    Denied { why: Denied, close: bool },
}

impl Access {
    /// A connection from `peer` whose session was authenticated as `auth`.
    pub fn new(
        users: Option<&'static Users>,
        throttle: &'static RefCell<AuthThrottle>,
        auth: ConnAuth,
        peer: PeerKey,
        counters: &'static ServiceCounters,
    ) -> Access {
        Access {
            users,
            throttle,
            auth,
            peer,
            counters,
        }
    }

    /// The connection comes through a proxy whose header named `client`: the throttle and
    /// the logs see that peer, and the socket's Unix peer uid (the proxy's) authenticates
    /// nobody.
    pub fn proxied(&mut self, client: PeerKey) {
        self.peer = client;
        self.auth = ConnAuth::new();
    }

    /// Who the connection is, for a hand-over (see [`ConnAuth::export`]).
    pub fn export(&self) -> Option<(UserName, [u8; 32])> {
        self.auth.export()
    }

    /// The user the connection acts as, if any (as of the last screening).
    pub fn user(&self) -> Option<&User> {
        self.auth.user()
    }

    /// Screens `request`. Without users everything is served (an AUTH is the service's to
    /// refuse).
    pub fn screen(&mut self, request: &impl Guarded) -> Screened {
        let Some(users) = self.users else {
            return Screened::Serve;
        };
        if let Some((user, token)) = request.credentials() {
            return self.auth(users, user, token);
        }
        match self.auth.check(users, request) {
            Ok(()) => Screened::Serve,
            Err(why) => {
                self.counters.denied.fetch_add(1, Relaxed);
                let user = self.auth.user_name();
                log::debug!(
                    "{} from {} ({user:?}): denied: {why}",
                    request.verb(),
                    self.peer
                );
                Screened::Denied { why, close: false }
            }
        }
    }

    fn auth(&mut self, users: &Users, user: &UserName, token: &AuthToken) -> Screened {
        // One thread per worker and no re-entry: the throttle is never borrowed twice.
        let mut throttle = self.throttle.borrow_mut();
        let answer = self
            .auth
            .auth(users, &mut throttle, self.peer, user, token, Instant::now());
        let counter = match answer.outcome {
            AuthOutcome::Accepted => &self.counters.auth_accepted,
            AuthOutcome::Failed => &self.counters.auth_failed,
            AuthOutcome::Throttled => &self.counters.auth_throttled,
        };
        counter.fetch_add(1, Relaxed);
        match answer.result {
            Ok(user) => Screened::Authenticated(user),
            Err(why) => Screened::Denied {
                why,
                close: answer.close,
            },
        }
    }
}
