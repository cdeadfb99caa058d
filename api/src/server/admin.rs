//! [`AdminApi`]: the admin service in domain types, and its gRPC adapter.

use std::future::Future;
use std::sync::Arc;

use futures::StreamExt;
use tonic::service::Routes;
use tonic::{Request, Response, Status};

use super::{MAX_MESSAGE_BYTES, WatchStream, refuse, reply};
use crate::convert::{kind_from_pb, required, required_kind};
use crate::pb;
use crate::pb::admin_server::{Admin, AdminServer};
use crate::types::validate;
use crate::{ApiError, Kind, Object, ObjectList};

/// The admin service: create, read, update, delete and watch stored
/// objects. Every object it is handed has passed its `validate`.
pub trait AdminApi: Send + Sync + 'static {
    /// Stores a new object; [`ApiError::AlreadyExists`] if the name is taken.
    /// Returns it as stored (uid, versions and timestamps set).
    fn create(&self, object: Object) -> impl Future<Output = Result<Object, ApiError>> + Send;

    /// Reads one object; [`ApiError::NotFound`] if there is none.
    fn get(
        &self,
        kind: Kind,
        name: String,
    ) -> impl Future<Output = Result<Object, ApiError>> + Send;

    /// Reads every object of a kind, with the version the list was read at.
    fn list(&self, kind: Kind) -> impl Future<Output = Result<ObjectList, ApiError>> + Send;

    /// Reads every object of every kind at one version: a consistent
    /// snapshot of the whole state (a backup). The default lists each kind
    /// and answers [`ApiError::Unavailable`] unless all were read at the
    /// same version; a store that can read everything at once overrides it.
    fn list_all(&self) -> impl Future<Output = Result<ObjectList, ApiError>> + Send {
        async {
            let mut all = ObjectList::default();
            for (i, kind) in Kind::ALL.into_iter().enumerate() {
                let list = self.list(kind).await?;
                if i > 0 && list.resource_version != all.resource_version {
                    return Err(ApiError::Unavailable {
                        reason: "the state changed while it was being listed; retry".into(),
                    });
                }
                all.resource_version = list.resource_version;
                all.objects.extend(list.objects);
            }
            Ok(all)
        }
    }

    /// Replaces an object if `meta.resource_version` is still its current
    /// version ([`ApiError::Aborted`] otherwise). Returns it as stored.
    fn update(&self, object: Object) -> impl Future<Output = Result<Object, ApiError>> + Send;

    /// Deletes an object, if still at `expected_resource_version` when
    /// given ([`ApiError::Aborted`] otherwise). Returns it as it was. A
    /// node with VMs placed on it is refused
    /// ([`ApiError::FailedPrecondition`] naming them) unless `force`.
    fn delete(
        &self,
        kind: Kind,
        name: String,
        expected_resource_version: Option<u64>,
        force: bool,
    ) -> impl Future<Output = Result<Object, ApiError>> + Send;

    /// Streams the changes to objects of `kind` (every kind when `None`)
    /// with a resource version above `from_resource_version`, or from now
    /// on when it is 0; [`ApiError::OutOfRange`] when that version is
    /// already compacted.
    fn watch(
        &self,
        kind: Option<Kind>,
        from_resource_version: u64,
    ) -> impl Future<Output = Result<WatchStream, ApiError>> + Send;
}

impl<T: AdminApi> AdminApi for Arc<T> {
    fn create(&self, object: Object) -> impl Future<Output = Result<Object, ApiError>> + Send {
        T::create(self, object)
    }

    fn get(
        &self,
        kind: Kind,
        name: String,
    ) -> impl Future<Output = Result<Object, ApiError>> + Send {
        T::get(self, kind, name)
    }

    fn list(&self, kind: Kind) -> impl Future<Output = Result<ObjectList, ApiError>> + Send {
        T::list(self, kind)
    }

    fn list_all(&self) -> impl Future<Output = Result<ObjectList, ApiError>> + Send {
        T::list_all(self)
    }

    fn update(&self, object: Object) -> impl Future<Output = Result<Object, ApiError>> + Send {
        T::update(self, object)
    }

    fn delete(
        &self,
        kind: Kind,
        name: String,
        expected_resource_version: Option<u64>,
        force: bool,
    ) -> impl Future<Output = Result<Object, ApiError>> + Send {
        T::delete(self, kind, name, expected_resource_version, force)
    }

    fn watch(
        &self,
        kind: Option<Kind>,
        from_resource_version: u64,
    ) -> impl Future<Output = Result<WatchStream, ApiError>> + Send {
        T::watch(self, kind, from_resource_version)
    }
}

/// Serves `api` as the admin service.
pub fn admin_routes<T: AdminApi>(api: T) -> Routes {
    add_admin_routes(Routes::default(), api)
}

/// Adds the admin service, served by `api`, to `routes`.
pub fn add_admin_routes<T: AdminApi>(routes: Routes, api: T) -> Routes {
    routes.add_service(
        AdminServer::new(AdminAdapter(Arc::new(api)))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    )
}

/// Implements the generated service on top of an [`AdminApi`].
#[derive(Debug)]
struct AdminAdapter<T>(Arc<T>);

type PbWatchStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl<T: AdminApi> Admin for AdminAdapter<T> {
    async fn create(
        &self,
        request: Request<pb::CreateRequest>,
    ) -> Result<Response<pb::Object>, Status> {
        let result = async {
            let object = required(request.into_inner().object, "object")?.try_into()?;
            self.0.create(object).await
        };
        reply("Create", result.await)
    }

    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<pb::Object>, Status> {
        let result = async {
            let request = request.into_inner();
            let kind = required_kind(request.kind, "kind")?;
            validate::name("name", &request.name)?;
            self.0.get(kind, request.name).await
        };
        reply("Get", result.await)
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let result = async {
            // KIND_UNSPECIFIED lists every kind at one version.
            match kind_from_pb(request.into_inner().kind, "kind")? {
                Some(kind) => self.0.list(kind).await,
                None => self.0.list_all().await,
            }
        };
        reply("List", result.await)
    }

    async fn update(
        &self,
        request: Request<pb::UpdateRequest>,
    ) -> Result<Response<pb::Object>, Status> {
        let result = async {
            let object = required(request.into_inner().object, "object")?.try_into()?;
            self.0.update(object).await
        };
        reply("Update", result.await)
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::Object>, Status> {
        let result = async {
            let request = request.into_inner();
            let kind = required_kind(request.kind, "kind")?;
            validate::name("name", &request.name)?;
            self.0
                .delete(
                    kind,
                    request.name,
                    request.expected_resource_version,
                    request.force,
                )
                .await
        };
        reply("Delete", result.await)
    }

    type WatchStream = PbWatchStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<PbWatchStream>, Status> {
        let result = async {
            let request = request.into_inner();
            let kind = kind_from_pb(request.kind, "kind")?;
            let events = self.0.watch(kind, request.from_resource_version).await?;
            Ok(events.map(|event| event.map(pb::WatchEvent::from).map_err(Status::from)))
        };
        match result.await {
            Ok(events) => Ok(Response::new(Box::pin(events) as PbWatchStream)),
            Err(err) => Err(refuse("Watch", err)),
        }
    }
}
