import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import IOURing
import Prometheus
#if canImport(Glibc)
import Glibc
#endif

/// Writes one response onto a client connection.
///
/// Writes go straight to the `Channel` and are awaited where it matters, so
/// that a file region's descriptor is known to be done with before it is
/// closed and a slow client pushes back on whoever produces the bytes.
struct ResponseChannel: Sendable {
    let channel: any Channel
    let keepAlive: Bool
    let version: HTTPVersion
    /// The connection's close, for waits that must end when the client goes.
    let closeWatch: CloseWatch
    /// Reads file bytes on the thread pool, `readChunk` at a time: always
    /// on a TLS connection (bytes must be read to be encrypted), and for any
    /// region not wholly in the page cache, so a `sendfile` never waits for
    /// the disk on the event loop.
    var fileIO: NonBlockingFileIO? = nil
    /// A TLS connection: no sendfile at all.
    var tls = false
    /// Counts the bytes read on the pool for lack of the page cache.
    var coldReads: Counter? = nil
    /// When the response head went out, for the time-to-first-byte histogram.
    let headSentAt = NIOLockedValueBox<ContinuousClock.Instant?>(nil)

    /// What the request log says of the answer: body bytes written, and
    /// how it was answered when a responder said so.
    struct Record {
        var bytes: Int64 = 0
        var answer: RequestLog.Answer?
        /// The upstream the request was routed to (its `host`).
        var upstream: String?
        /// The status of the head sent, if one was: a request that fails
        /// after its head (a client gone before the last write) is counted
        /// with the status its client got.
        var status: HTTPResponseStatus?
        /// The request's kind for metrics and logs, once routed.
        var kind: String?
        /// `abort` was called; the answer was cut if fewer body bytes than
        /// announced went out (`isCut`).
        var aborted = false
        /// The body length the head announced.
        var announced: Int64?

        /// Cut short: aborted before the announced length (or, with no
        /// length announced, aborted at all). A client that took its
        /// whole answer and left before the last empty write was not cut.
        var isCut: Bool { aborted && (announced.map { bytes < $0 } ?? true) }
    }
    let record = NIOLockedValueBox(Record())

    /// How the request was answered; `offline` stays once said (the
    /// offline answer is then also a hit).
    func answered(_ answer: RequestLog.Answer) {
        record.withLockedValue { if $0.answer != .offline { $0.answer = answer } }
    }

    fileprivate func sent(_ count: Int) {
        record.withLockedValue { $0.bytes += Int64(count) }
    }

    /// Largest file region handed to one write: NIO gives a region's whole
    /// length to one `sendfile`, and one huge call would hold the event loop
    /// (nginx's `sendfile_max_chunk` does the same). It is also the unit of
    /// the page-cache check. When each region cost a hop to the event loop
    /// and back, 1 MiB regions measured 45% more CPU per GB than 4 MiB at
    /// eight connections (`CONNS=8 benchmarks/profile.sh big`: 0.175 against
    /// 0.12 s/GB), for no steadier latency beside them (`cold_hit.sh`); warm
    /// regions are now queued from the loop (`sendResident`), a cold one
    /// still costs its hops.
    static let maxRegion: Int64 = 4 * 1024 * 1024

    /// Bytes read per step on the thread pool: large enough that the
    /// thread hop is a small share of the cost, small enough that a slow
    /// client holds little memory (at most two chunks: one being written,
    /// one being read).
    static let readChunk = 512 * 1024

    func head(_ status: HTTPResponseStatus, _ headers: HTTPHeaders) {
        var headers = headers
        if !keepAlive { headers.replaceOrAdd(name: "connection", value: "close") }
        headSentAt.withLockedValue { $0 = $0 ?? .now }
        let announced = headers.first(name: "content-length").flatMap { Int64($0) }
        record.withLockedValue {
            $0.status = $0.status ?? status
            $0.announced = $0.announced ?? announced
        }
        channel.write(HTTPServerResponsePart.head(HTTPResponseHead(version: version, status: status, headers: headers)),
                      promise: nil)
    }

    /// Waits for the write only when the channel has stopped being writable:
    /// a fast client costs no round trip per chunk, a slow one still pushes
    /// back. (A failed unawaited write shows up at `end()`.)
    /// Sends what was written so far, without waiting (a head whose body is
    /// not ready yet: clients time out waiting for headers, not for bytes).
    func flush() {
        channel.flush()
    }

    func body(_ buffer: ByteBuffer) async throws {
        sent(buffer.readableBytes)
        let part = HTTPServerResponsePart.body(.byteBuffer(buffer))
        if channel.isWritable {
            channel.writeAndFlush(part, promise: nil)
        } else {
            try await channel.writeAndFlush(part)
        }
    }

    /// Sends `range` of the file with `sendfile`, in bounded regions; a
    /// region not wholly in the page cache is read on the thread pool and
    /// written from memory instead (over TLS: every region is).
    func file(_ handle: NIOFileHandle, range: Range<Int64>) async throws {
        if tls, let fileIO { return try await readAndSend(handle, range: range, fileIO: fileIO) }
        // A warm file goes all the way from the event loop.
        var offset = try await sendResident(handle, range: range, checked: fileIO != nil)
        guard offset < range.upperBound, let fileIO else { return }
        // From the first cold region on: which regions of the answer were
        // wholly cached at that moment, before any read of this answer on
        // the pool set off readahead. Pages the readahead has in flight
        // count as cached but a `sendfile` of them would wait for the disk
        // on the loop, so only a region cached then (and still) goes by
        // `sendfile`: a few pages reclaimed from a warm file (proactive
        // reclaim takes idle-looking ones) cost their regions, a cold file
        // stays on the pool to its end.
        let firstCold = offset
        let cachedAtFirstCold = stride(from: offset, to: range.upperBound, by: Int(Self.maxRegion)).map {
            isResident(handle, $0..<min(range.upperBound, $0 + Self.maxRegion))
        }
        while offset < range.upperBound {
            let end = min(range.upperBound, offset + Self.maxRegion)
            let index = Int((offset - firstCold) / Self.maxRegion)
            if index > 0, index < cachedAtFirstCold.count, cachedAtFirstCold[index], isResident(handle, offset..<end) {
                let region = FileRegion(fileHandle: handle, readerIndex: Int(offset), endIndex: Int(end))
                let channel = self.channel
                try await channel.eventLoop.flatSubmit { CutFileWatch.send(region, on: channel) }.get()
                sent(Int(end - offset))
            } else {
                coldReads?.increment(by: end - offset)
                try await readAndSend(handle, range: offset..<end, fileIO: fileIO)
            }
            offset = end
        }
    }

    /// Sends the regions of `range` that are wholly in the page cache
    /// (every one, unless `checked`) from the event loop, one after
    /// another, and returns where it stopped: the end of the range, or the
    /// start of the first region that is not cached.
    ///
    /// Awaiting each region from the task cost two thread wake-ups per
    /// region (the loop's and the task pool's), and the socket could drain
    /// meanwhile. Here the loop itself checks and writes the next region as
    /// soon as the kernel has taken the last one (whose bytes still fill
    /// the socket buffer), but never without letting the loop look at its
    /// other connections first: a region taken at once (a client reading as
    /// fast as `sendfile` pushes) waits a moment, so the loop goes back to
    /// its selector; a loop task alone would not (NIO runs the tasks queued
    /// by tasks in the same tick), nor would writing inside the completion
    /// (the same flush takes it up), and either kept every other
    /// connection of the loop waiting for a whole blob. And one region at
    /// a time, so a region's pages are checked just before it is written,
    /// not a region earlier: a page evicted in between would make
    /// `sendfile` wait for the disk on the loop.
    private func sendResident(_ handle: NIOFileHandle, range: Range<Int64>, checked: Bool) async throws -> Int64 {
        guard !range.isEmpty else { return range.lowerBound }
        let eventLoop = channel.eventLoop
        let stopped = eventLoop.makePromise(of: Int64.self)
        let responder = self
        eventLoop.execute {
            ResidentRegions(responder: responder, handle: handle, range: range, checked: checked, stopped: stopped)
                .start()
        }
        return try await stopped.futureResult.get()
    }

    /// The loop's side of `sendResident`: one region written at a time. It
    /// answers only once its last write is over, so the caller may close
    /// the file as soon as it hears.
    ///
    /// Each region costs NIO's write path (the pipeline's handlers, a
    /// promise) however it is sent; two costs per region are cut here, as
    /// they were about a fifth of the proxy's user time on a large cached
    /// blob at eight connections (`perf record -e cpu-clock:u`, RESULTS.md
    /// 2026-12-07):
    /// - the channel's writability flipping twice per region (a 4 MiB
    ///   region is far above the usual high water mark, and every flip
    ///   walks the pipeline and the async writer's lock): while a file of
    ///   more than one region goes out, the high mark is raised above two
    ///   regions. Nothing else
    ///   is written on the connection meanwhile, and a region holds no
    ///   memory, so the mark bounds nothing then; the usual marks are put
    ///   back before the caller hears.
    /// - a cut-file watch (an object and a timer set and cancelled) per
    ///   region: one repeating watch serves the whole answer, looking at
    ///   the region out at the moment.
    private final class ResidentRegions {
        /// The pause after a region the socket took whole: long enough that
        /// the loop polls its selector before the next, short beside the
        /// millisecond or more that `sendfile` takes for 4 MiB.
        static let pause = TimeAmount.microseconds(50)
        /// The high water mark while the file goes out: above a region and
        /// the head written before it (the low one stays).
        static let sendingHigh = Int(2 * ResponseChannel.maxRegion)
        let responder: ResponseChannel
        let handle: NIOFileHandle
        let range: Range<Int64>
        let checked: Bool
        let stopped: EventLoopPromise<Int64>
        /// The start of the next region to write.
        var next: Int64
        /// Watches whichever region is out, for the whole answer.
        let cutWatch: CutFileWatch
        /// The marks to put back; nil until raised (or when the channel
        /// has no synchronous options).
        var usualMarks: ChannelOptions.Types.WriteBufferWaterMark?

        init(responder: ResponseChannel, handle: NIOFileHandle, range: Range<Int64>, checked: Bool,
             stopped: EventLoopPromise<Int64>) {
            self.responder = responder
            self.handle = handle
            self.range = range
            self.checked = checked
            self.stopped = stopped
            self.next = range.lowerBound
            self.cutWatch = CutFileWatch(channel: responder.channel)
        }

        func start() {
            // One region flips writability at most once each way: raising
            // the mark for it (three option calls, each a chain of dynamic
            // casts in NIO) would cost more than it saves. A follower of a
            // fill sends the file a batch at a time.
            if range.count > ResponseChannel.maxRegion, let options = responder.channel.syncOptions,
               let marks = try? options.getOption(ChannelOptions.writeBufferWaterMark), marks.high < Self.sendingHigh,
               (try? options.setOption(ChannelOptions.writeBufferWaterMark,
                                       value: .init(low: marks.low, high: Self.sendingHigh))) != nil {
                usualMarks = marks
            }
            writeNext()
        }

        private func stop(_ result: Result<Int64, any Error>) {
            cutWatch.stop()
            if let usualMarks {
                try? responder.channel.syncOptions?.setOption(ChannelOptions.writeBufferWaterMark, value: usualMarks)
            }
            stopped.completeWith(result)
        }

        private func writeNext() {
            let end = min(range.upperBound, next + ResponseChannel.maxRegion)
            guard next < range.upperBound, !checked || responder.isResident(handle, next..<end) else {
                return stop(.success(next))
            }
            let region = FileRegion(fileHandle: handle, readerIndex: Int(next), endIndex: Int(end))
            let channel = responder.channel
            let eventLoop = channel.eventLoop.assumeIsolated()
            var inWrite = true
            var over = false
            channel.writeAndFlush(HTTPServerResponsePart.body(.fileRegion(region))).assumeIsolated()
                .whenComplete { [self] result in
                    over = true
                    cutWatch.regionDone()
                    switch result {
                    case .success:
                        responder.sent(region.readableBytes)
                        next = end
                        if inWrite {
                            eventLoop.scheduleTask(in: Self.pause) { self.writeNext() }
                        } else {
                            eventLoop.execute { self.writeNext() }
                        }
                    case .failure(let error):
                        stop(.failure(error))
                    }
                }
            inWrite = false
            if !over { cutWatch.watch(region) }
        }
    }

    /// Watches a file region while it is out: a file cut short under a send
    /// (something outside the proxy truncated it; the proxy's own files
    /// are written whole and renamed into place, and only ever unlinked)
    /// makes `sendfile` meet the file's end before the region's, send
    /// nothing and return, and NIO tries again at every writable event: the
    /// loop would spin, a core busy, until the send timeout (a minute by
    /// default). Every half second while the region is out, the file's
    /// size is looked at (`fstat`, no disk wait) and the connection reset
    /// once the file no longer reaches the region's end (a reset, as
    /// `abort` does: an answer without a length must not end as if whole).
    /// One watch serves a whole answer sent region by region
    /// (`ResidentRegions`): its timer runs while some region is out, and a
    /// region written within its flush (a small one) costs no timer at all,
    /// one the socket takes in several goes (most 4 MiB regions) a timer
    /// every half second, microseconds beside its `sendfile`s.
    /// On the channel's event loop.
    private final class CutFileWatch {
        static let interval = TimeAmount.milliseconds(500)
        let channel: any Channel
        /// The region out now; nil between regions and after the last.
        private var region: FileRegion?
        private var timer: Scheduled<Void>?

        init(channel: any Channel) {
            self.channel = channel
        }

        /// Writes and flushes `region` as a body part, watched.
        static func send(_ region: FileRegion, on channel: any Channel) -> EventLoopFuture<Void> {
            let written = channel.writeAndFlush(HTTPServerResponsePart.body(.fileRegion(region)))
            watch(written, region: region, on: channel)
            return written
        }

        /// Watches `region`, written (and flushed) as `written`, with a
        /// watch of its own.
        static func watch(_ written: EventLoopFuture<Void>, region: FileRegion, on channel: any Channel) {
            let watch = CutFileWatch(channel: channel)
            var over = false
            written.assumeIsolated().whenComplete { _ in
                over = true
                watch.stop()
            }
            if !over { watch.watch(region) }
        }

        /// `region` is out from now until `regionDone` (or `stop`).
        func watch(_ region: FileRegion) {
            self.region = region
            if timer == nil { arm() }
        }

        /// The region out is written; the timer lapses at its next turn
        /// unless another region goes out by then.
        func regionDone() {
            region = nil
        }

        /// Nothing more goes out.
        func stop() {
            region = nil
            timer?.cancel()
            timer = nil
        }

        private func arm() {
            timer = channel.eventLoop.assumeIsolated().scheduleTask(in: Self.interval) { [self] in
                timer = nil
                guard let region else { return }
                if Self.isCut(region) {
                    ResponseChannel.reset(channel)
                } else {
                    arm()
                }
            }
        }

        /// Whether the file no longer reaches the end of `region`, whose
        /// write still holds the descriptor open (`fstat`: no disk wait).
        static func isCut(_ region: FileRegion) -> Bool {
            let size = try? region.fileHandle.withUnsafeFileDescriptor { fd -> Int64 in
                var status = stat()
                return fstat(fd, &status) == 0 ? Int64(status.st_size) : -1
            }
            if let size, size >= 0, size < region.endIndex { return true }
            return false
        }
    }

    /// A small file read whole on the thread pool; nil when there is no
    /// pool or the file came up short.
    func readWhole(_ handle: NIOFileHandle, size: Int64) async -> ByteBuffer? {
        guard let fileIO else { return nil }
        let buffer = try? await fileIO.read(fileHandle: handle, fromOffset: 0, byteCount: Int(size),
                                            allocator: channel.allocator, eventLoop: channel.eventLoop).get()
        return buffer?.readableBytes == Int(size) ? buffer : nil
    }

    /// Whether a `sendfile` of the range would be served from memory.
    /// A page evicted between this and the `sendfile` makes that one call
    /// wait for the disk: a narrow window, where asking nothing made every
    /// cold hit wait.
    fileprivate func isResident(_ handle: NIOFileHandle, _ range: Range<Int64>) -> Bool {
        (try? handle.withUnsafeFileDescriptor {
            PageCache.isResident(fd: $0, offset: range.lowerBound, length: Int64(range.count))
        }) ?? false
    }

    /// The next chunk is read while the current one is written, so the disk
    /// (or page cache) and the encryption overlap.
    private func readAndSend(_ handle: NIOFileHandle, range: Range<Int64>, fileIO: NonBlockingFileIO) async throws {
        let (allocator, eventLoop) = (channel.allocator, channel.eventLoop)
        func read(from offset: Int64) -> EventLoopFuture<ByteBuffer> {
            let count = Int(min(Int64(Self.readChunk), range.upperBound - offset))
            return fileIO.read(fileHandle: handle, fromOffset: offset, byteCount: count, allocator: allocator,
                               eventLoop: eventLoop)
        }
        var offset = range.lowerBound
        var next: EventLoopFuture<ByteBuffer>? = read(from: offset)
        do {
            while let pending = next {
                next = nil
                let chunk = try await pending.get()
                guard chunk.readableBytes > 0 else {
                    throw IOError(errnoCode: EIO, reason: "cached file shorter than its index entry")
                }
                offset += Int64(chunk.readableBytes)
                try checkClientPresent()  // a client that left costs no more reads
                if offset < range.upperBound { next = read(from: offset) }
                try await channel.writeAndFlush(HTTPServerResponsePart.body(.byteBuffer(chunk)))
                sent(chunk.readableBytes)
            }
        } catch {
            // The caller closes the file when this returns: a read still on
            // the thread pool must be over by then.
            _ = try? await next?.get()
            throw error
        }
    }

    /// A whole response whose body is one file region: head, body and end
    /// are handed to the event loop in one hop (the hit path for small blobs).
    func fileResponse(_ status: HTTPResponseStatus, _ headers: HTTPHeaders, _ handle: NIOFileHandle,
                      range: Range<Int64>) async throws {
        guard range.count <= Self.maxRegion, !tls, fileIO == nil || isResident(handle, range) else {
            head(status, headers)
            try await file(handle, range: range)
            try await end()
            return
        }
        var headers = headers
        if !keepAlive { headers.replaceOrAdd(name: "connection", value: "close") }
        headSentAt.withLockedValue { $0 = $0 ?? .now }
        record.withLockedValue {
            $0.status = $0.status ?? status
            $0.announced = $0.announced ?? Int64(range.count)
        }
        let head = HTTPResponseHead(version: version, status: status, headers: headers)
        let region = FileRegion(fileHandle: handle, readerIndex: Int(range.lowerBound), endIndex: Int(range.upperBound))
        let channel = self.channel
        try await channel.eventLoop.flatSubmit {
            channel.write(HTTPServerResponsePart.head(head), promise: nil)
            let body = range.isEmpty ? nil : channel.write(HTTPServerResponsePart.body(.fileRegion(region)))
            let ended = channel.writeAndFlush(HTTPServerResponsePart.end(nil))
            if let body { CutFileWatch.watch(body, region: region, on: channel) }
            return ended
        }.get()
        sent(range.count)
    }

    func end() async throws {
        try await channel.writeAndFlush(HTTPServerResponsePart.end(nil))
    }

    /// Throws `ClientGone` when the client's connection closed while its
    /// answer was being prepared (a long wait for a fill, say).
    func checkClientPresent() throws {
        guard channel.isActive else { throw ClientGone() }
    }

    /// Cuts the connection mid-response: the client sees a short body, never
    /// a complete-looking wrong one.
    ///
    /// A reset, not a clean close: with a length or chunked framing a close
    /// already reads as cut, but an HTTP/1.0 answer of unknown length ends
    /// at the close, and only a reset tells it apart from a complete body.
    func abort() {
        record.withLockedValue { $0.aborted = true }
        Self.reset(channel)
    }

    /// Closes `channel` with a reset (`SO_LINGER` 0), not a `FIN`.
    fileprivate static func reset(_ channel: any Channel) {
        guard let options = channel as? SocketOptionProvider else { return channel.close(promise: nil) }
        options.setSoLinger(linger(l_onoff: 1, l_linger: 0)).whenComplete { _ in
            channel.close(promise: nil)
        }
    }

    /// A whole small response (local endpoints, errors, upstream error answers).
    func send(_ status: HTTPResponseStatus, headers: HTTPHeaders = [:], body: ByteBuffer, omitBody: Bool = false) async throws {
        var headers = headers
        headers.replaceOrAdd(name: "content-length", value: String(body.readableBytes))
        head(status, headers)
        if !omitBody, body.readableBytes > 0 {
            sent(body.readableBytes)
            channel.write(HTTPServerResponsePart.body(.byteBuffer(body)), promise: nil)
        }
        try await end()
    }

    func send(_ error: OCIError, omitBody: Bool = false) async throws {
        try await send(error.status, headers: ["content-type": "application/json"],
                       body: ByteBuffer(string: error.body), omitBody: omitBody)
    }
}

/// The client's connection closed while its answer was being prepared.
struct ClientGone: Error {}
