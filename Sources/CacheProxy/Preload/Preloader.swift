import AsyncHTTPClient
import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1

/// `cache-proxy preload`: pulls images through a proxy on the cache folder
/// (a running server, or one started for the purpose: `PreloadEndpoint`),
/// as an anonymous client would, so that everything it loads went through
/// the one verified fill path and is recorded as a pull: the tag in the
/// tag table, the grants and links in the offline memory. What it loads is
/// then served offline to the clients it would be served to online.
///
/// It resolves an image as a pull does: an index ─► the platforms asked
/// for (default this machine's) ─► each image manifest ─► its config and
/// layers. A blob already in the folder is not fetched again, only asked
/// for with a `HEAD` (which records the upstream's yes for this
/// repository): a rerun after a failure fetches only what is missing.
public struct Preloader: Sendable {
    public struct Options: Sendable {
        public var platforms: [Platform]
        public var allPlatforms: Bool
        /// Images preloaded at once.
        public var jobs: Int

        public init(platforms: [Platform] = [], allPlatforms: Bool = false, jobs: Int = 2) {
            (self.platforms, self.allPlatforms, self.jobs) = (platforms, allPlatforms, jobs)
        }
    }

    /// What one image came to.
    public struct Outcome: Sendable {
        public let image: String
        public var failure: String?
        public var blobsFetched = 0
        public var blobsCached = 0
        public var bytesFetched: Int64 = 0
        public var seconds: Double = 0
    }

    struct Failure: Error, CustomStringConvertible {
        let description: String
    }

    /// A blob an image needs: its digest and size from the manifest.
    struct Needed: Hashable {
        let digest: Digest
        let size: Int64
    }

    /// Anonymous tokens by realm and scope: the token dance a client does
    /// (Docker Hub, ghcr.io and quay answer a token-less pull with a
    /// `Bearer` challenge, even for public images).
    final class Tokens: Sendable {
        let byScope = NIOLockedValueBox<[String: String]>([:])
    }

    let http: HTTPClient
    let tokens = Tokens()
    /// `http://127.0.0.1:PORT` of the proxy pulled through.
    let base: String
    let storage: String
    let options: Options
    let progress: PreloadProgress

    /// Blobs fetched at once per image, as containerd does.
    static let blobsAtOnce = 3
    /// Manifests are small (registries refuse more than 4 MiB).
    static let manifestLimit = 4 << 20

    public init(http: HTTPClient, base: String, storage: String, options: Options, progress: PreloadProgress) {
        (self.http, self.base, self.storage, self.options, self.progress) = (http, base, storage, options, progress)
    }

    /// Preloads every image, `options.jobs` at a time, in the order given.
    public func run(_ images: [ImageReference]) async -> [Outcome] {
        await withTaskGroup(of: (Int, Outcome).self) { group in
            var outcomes = [Outcome?](repeating: nil, count: images.count)
            var next = 0
            func startNext() {
                // Stopped (a signal): no new image is started.
                guard next < images.count, !Task.isCancelled else { return }
                let (index, image) = (next, images[next])
                next += 1
                group.addTask { (index, await self.preload(image)) }
            }
            for _ in 0..<max(1, options.jobs) { startNext() }
            while let (index, outcome) = await group.next() {
                outcomes[index] = outcome
                startNext()
            }
            return outcomes.compactMap { $0 }
        }
    }

    func preload(_ image: ImageReference) async -> Outcome {
        let started = ContinuousClock.now
        let line = progress.begin(image.description)
        var outcome = Outcome(image: image.description)
        do {
            let needed = try await resolve(image)
            progress.resolved(line, blobs: needed.count, bytes: needed.reduce(0) { $0 + $1.size })
            try await fetch(needed, of: image, line: line, into: &outcome)
        } catch {
            outcome.failure = String(describing: error)
        }
        outcome.seconds = started.duration(to: .now).inSeconds
        progress.end(line, outcome)
        return outcome
    }

    /// The blobs the image needs on this machine's platforms (or those
    /// asked for), its manifests fetched (and so cached) on the way.
    func resolve(_ image: ImageReference) async throws -> [Needed] {
        // The ping a pull starts with: its answer is what the proxy gives
        // clients' pings when the upstream cannot be reached (`PingMemory`).
        var ping = HTTPClientRequest(url: "\(base)/v2/")
        ping.headers.add(name: "host", value: image.upstream.host)
        if let answer = try? await http.execute(ping, timeout: .seconds(60)) {
            _ = try? await answer.body.collect(upTo: 1 << 16)
        }
        let top = try await manifest(image, image.referencePath)
        var manifests: [[String: Any]] = []
        if let entries = top["manifests"] as? [[String: Any]] {
            let chosen = entries.filter { entry in
                guard !options.allPlatforms else { return true }
                guard let platform = Self.platform(of: entry) else { return false }
                let wanted = options.platforms.isEmpty ? [Platform.current] : options.platforms
                return wanted.contains { $0.matches(platform) }
            }
            guard !chosen.isEmpty else {
                let listed = entries.compactMap { Self.platform(of: $0)?.description }.joined(separator: ", ")
                throw Failure(description: "no manifest for \(Self.describe(options)) in the index (it has: \(listed))")
            }
            for entry in chosen {
                guard let text = entry["digest"] as? String, let digest = try? Digest(parsing: text) else {
                    throw Failure(description: "the index lists a manifest without a valid digest")
                }
                manifests.append(try await manifest(image, digest.description))
            }
        } else {
            manifests = [top]
        }
        var needed: [Needed] = []
        for manifest in manifests {
            let descriptors = [manifest["config"] as? [String: Any]].compactMap { $0 }
                + ((manifest["layers"] as? [[String: Any]]) ?? [])
            for descriptor in descriptors {
                // A foreign layer (`urls`) lives elsewhere: not the registry's.
                guard descriptor["urls"] == nil else { continue }
                guard let text = descriptor["digest"] as? String, let digest = try? Digest(parsing: text) else {
                    throw Failure(description: "a manifest lists a blob without a valid digest")
                }
                let size = (descriptor["size"] as? NSNumber)?.int64Value ?? 0
                let blob = Needed(digest: digest, size: size)
                if !needed.contains(blob) { needed.append(blob) }
            }
        }
        return needed
    }

    /// GETs a manifest through the proxy (so it is cached, and a tag
    /// recorded) and parses it.
    private func manifest(_ image: ImageReference, _ reference: String) async throws -> [String: Any] {
        let response = try await send(image, "manifests/\(reference)", method: .GET)
        let body = try await response.body.collect(upTo: Self.manifestLimit)
        guard response.status == .ok else {
            throw Failure(description: Self.explain(response.status, what: "manifest \(reference)"))
        }
        guard let object = (try? JSONSerialization.jsonObject(with: Data(body.readableBytesView))) as? [String: Any] else {
            throw Failure(description: "manifest \(reference) is not a JSON object")
        }
        return object
    }

    private func fetch(_ needed: [Needed], of image: ImageReference, line: Int, into outcome: inout Outcome) async throws {
        let results = try await withThrowingTaskGroup(of: (fetched: Bool, bytes: Int64).self) { group in
            var results: [(fetched: Bool, bytes: Int64)] = []
            var pending = needed[...]
            func startNext() {
                guard let blob = pending.popFirst() else { return }
                group.addTask { try await self.fetch(blob, of: image, line: line) }
            }
            for _ in 0..<Self.blobsAtOnce { startNext() }
            while let result = try await group.next() {
                results.append(result)
                startNext()
            }
            return results
        }
        for result in results {
            if result.fetched {
                outcome.blobsFetched += 1
                outcome.bytesFetched += result.bytes
            } else {
                outcome.blobsCached += 1
            }
        }
    }

    /// One blob: fetched through the proxy, or, when the folder holds it,
    /// only asked for (the `HEAD` records the upstream's yes).
    private func fetch(_ blob: Needed, of image: ImageReference, line: Int) async throws -> (fetched: Bool, bytes: Int64) {
        let path = "blobs/\(blob.digest)"
        if FileManager.default.fileExists(atPath: BlobStore.path(for: blob.digest, blobsFolder: storage + "/blobs")) {
            let response = try await send(image, path, method: .HEAD)
            guard response.status == .ok else {
                throw Failure(description: Self.explain(response.status, what: "blob \(blob.digest)"))
            }
            progress.advanced(line, bytes: blob.size, blobDone: true)
            return (false, 0)
        }
        let response = try await send(image, path, method: .GET)
        guard response.status == .ok else {
            _ = try? await response.body.collect(upTo: 1 << 16)
            throw Failure(description: Self.explain(response.status, what: "blob \(blob.digest)"))
        }
        var received: Int64 = 0
        do {
            for try await chunk in response.body {
                received += Int64(chunk.readableBytes)
                progress.advanced(line, bytes: Int64(chunk.readableBytes), blobDone: false)
            }
        } catch {
            throw Failure(description: "blob \(blob.digest): the download was cut (\(error))")
        }
        progress.advanced(line, bytes: max(0, blob.size - received), blobDone: true)
        return (true, received)
    }

    private func send(_ image: ImageReference, _ path: String, method: HTTPMethod) async throws -> HTTPClientResponse {
        var request = HTTPClientRequest(url: "\(base)/v2/\(image.repository)/\(path)")
        request.method = method
        // The upstream is picked by `Host`, as for any client of the proxy.
        request.headers.add(name: "host", value: image.upstream.host)
        request.headers.add(name: "accept", value: MediaType.manifestAccept)
        request.headers.add(name: "user-agent", value: "cache-proxy-preload")
        let scope = "repository:\(image.repository):pull"
        let tokenKey = image.upstream.host + " " + scope
        if let token = tokens.byScope.withLockedValue({ $0[tokenKey] }) {
            request.headers.add(name: "authorization", value: "Bearer \(token)")
        }
        do {
            let response = try await http.execute(request, timeout: .hours(1))
            // A challenge: no token yet, or the one used expired (Docker
            // Hub's last five minutes; a long preload outlives several).
            // One new token, one retry.
            guard response.status == .unauthorized,
                  let challenge = AuthChallenge.parse(response.headers["www-authenticate"].joined(separator: ", "))
                    .first(where: { $0.scheme == "bearer" }),
                  let token = try await anonymousToken(challenge, scope: scope) else { return response }
            _ = try? await response.body.collect(upTo: 1 << 16)
            tokens.byScope.withLockedValue { $0[tokenKey] = token }
            request.headers.replaceOrAdd(name: "authorization", value: "Bearer \(token)")
            return try await http.execute(request, timeout: .hours(1))
        } catch let failure as Failure {
            throw failure
        } catch {
            throw Failure(description: "the proxy could not be asked for \(path): \(error)")
        }
    }

    /// An anonymous token from the challenge's realm, as a client gets one;
    /// nil when the realm gives none (the 401 then stands).
    private func anonymousToken(_ challenge: AuthChallenge, scope: String) async throws -> String? {
        guard let realm = challenge["realm"], realm.hasPrefix("https://") || realm.hasPrefix("http://") else {
            return nil
        }
        var query = [("scope", challenge["scope"] ?? scope)]
        if let service = challenge["service"] { query.insert(("service", service), at: 0) }
        let encoded = query.map { "\($0.0)=\(UpstreamAuth.encode($0.1))" }.joined(separator: "&")
        let request = HTTPClientRequest(url: realm + (realm.contains("?") ? "&" : "?") + encoded)
        guard let response = try? await http.execute(request, timeout: .seconds(60)), response.status == .ok,
              let body = try? await response.body.collect(upTo: 1 << 20),
              let object = (try? JSONSerialization.jsonObject(with: Data(body.readableBytesView))) as? [String: Any]
        else { return nil }
        return (object["token"] as? String) ?? (object["access_token"] as? String)
    }

    static func platform(of entry: [String: Any]) -> Platform? {
        guard let platform = entry["platform"] as? [String: Any], let os = platform["os"] as? String,
              let architecture = platform["architecture"] as? String else { return nil }
        return Platform(os: os, architecture: architecture, variant: platform["variant"] as? String)
    }

    static func describe(_ options: Options) -> String {
        (options.platforms.isEmpty ? [Platform.current] : options.platforms).map(\.description)
            .joined(separator: ", ")
    }

    static func explain(_ status: HTTPResponseStatus, what: String) -> String {
        switch status.code {
        case 401, 403:
            return "\(what): \(status.code) from the upstream (preload pulls as an anonymous client, or as the upstream's username when one is configured: configure one that may read this repository)"
        case 404: return "\(what): not found upstream (404)"
        default: return "\(what): \(status.code) \(status.reasonPhrase)"
        }
    }
}
