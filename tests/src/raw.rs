//! A bare HTTP/2 client, for what a well-behaved gRPC client never does:
//! reset a stream after its headers, or stop reading (a flow-control window
//! of zero, so that the server can send no response data).

use bytes::Bytes;
use h2::client::SendRequest;

/// One HTTP/2 connection to a service.
pub struct RawConnection {
    /// Opens streams.
    pub client: SendRequest<Bytes>,
    /// Round trips on the connection: once a pong is back, the server has
    /// read every frame sent before the ping.
    pub ping_pong: h2::PingPong,
    authority: String,
}

impl RawConnection {
    /// Connects to `endpoint` (`http://127.0.0.1:port`), offering the
    /// server `window` bytes per stream (0: the client reads nothing).
    ///
    /// # Panics
    /// When the connection cannot be made.
    pub async fn open(endpoint: &str, window: u32) -> Self {
        let authority = endpoint.trim_start_matches("http://").to_owned();
        let tcp = tokio::net::TcpStream::connect(&authority).await.expect("connect");
        let (client, mut connection) = h2::client::Builder::new()
            .initial_window_size(window)
            .handshake::<_, Bytes>(tcp)
            .await
            .expect("HTTP/2 handshake");
        let ping_pong = connection.ping_pong().expect("the connection's ping-pong");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let client = client.ready().await.expect("ready");
        Self {
            client,
            ping_pong,
            authority,
        }
    }

    /// Opens a stream calling `path` (`/pkg.Service/Method`) with `bearer`
    /// as its token (none: no `authorization`), its body still to send.
    ///
    /// # Panics
    /// When the stream cannot be opened.
    pub async fn call(
        &mut self,
        path: &str,
        bearer: Option<&str>,
    ) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
        let mut request = http::Request::builder()
            .method("POST")
            .uri(format!("http://{}{path}", self.authority))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if let Some(token) = bearer {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = request.body(()).expect("a request");
        self.client = self.client.clone().ready().await.expect("ready");
        self.client.send_request(request, false).expect("a stream")
    }

    /// Waits until the server has read every frame sent so far.
    ///
    /// # Panics
    /// When the connection broke.
    pub async fn round_trip(&mut self) {
        self.ping_pong.ping(h2::Ping::opaque()).await.expect("pong");
    }
}

/// `message` as one gRPC frame (uncompressed, length-prefixed).
#[must_use]
pub fn grpc_frame(message: &impl prost::Message) -> Bytes {
    let body = message.encode_to_vec();
    let mut frame = Vec::with_capacity(5 + body.len());
    frame.push(0);
    frame.extend_from_slice(&u32::try_from(body.len()).expect("a small message").to_be_bytes());
    frame.extend_from_slice(&body);
    Bytes::from(frame)
}
